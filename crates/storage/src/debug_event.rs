//! The points a format engine announces to the storage below it while it works
//! (QEMU's `BlkdebugEvent`s): a debugging filter can fail the operations that
//! follow one. The names are QEMU's, so QEMU's blkdebug rule files work unchanged.

macro_rules! events {
    ($($variant:ident => $name:literal,)*) => {
        /// An event a format engine announces (QEMU's name in quotes).
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum DebugEvent {
            $(#[doc = $name] $variant,)*
        }

        impl DebugEvent {
            /// Every event, in QEMU's order.
            pub const ALL: &'static [DebugEvent] = &[$(DebugEvent::$variant,)*];

            /// QEMU's name of the event.
            pub fn name(self) -> &'static str {
                match self {
                    $(DebugEvent::$variant => $name,)*
                }
            }
        }
    };
}

events! {
    L1Update => "l1_update",
    L1GrowAllocTable => "l1_grow_alloc_table",
    L1GrowWriteTable => "l1_grow_write_table",
    L1GrowActivateTable => "l1_grow_activate_table",
    L2Load => "l2_load",
    L2Update => "l2_update",
    L2UpdateCompressed => "l2_update_compressed",
    L2AllocCowRead => "l2_alloc_cow_read",
    L2AllocWrite => "l2_alloc_write",
    ReadAio => "read_aio",
    ReadBackingAio => "read_backing_aio",
    ReadCompressed => "read_compressed",
    WriteAio => "write_aio",
    WriteCompressed => "write_compressed",
    VmstateLoad => "vmstate_load",
    VmstateSave => "vmstate_save",
    CowRead => "cow_read",
    CowWrite => "cow_write",
    ReftableLoad => "reftable_load",
    ReftableGrow => "reftable_grow",
    ReftableUpdate => "reftable_update",
    RefblockLoad => "refblock_load",
    RefblockUpdate => "refblock_update",
    RefblockUpdatePart => "refblock_update_part",
    RefblockAlloc => "refblock_alloc",
    RefblockAllocHookup => "refblock_alloc_hookup",
    RefblockAllocWrite => "refblock_alloc_write",
    RefblockAllocWriteBlocks => "refblock_alloc_write_blocks",
    RefblockAllocWriteTable => "refblock_alloc_write_table",
    RefblockAllocSwitchTable => "refblock_alloc_switch_table",
    ClusterAlloc => "cluster_alloc",
    ClusterAllocBytes => "cluster_alloc_bytes",
    ClusterFree => "cluster_free",
    FlushToOs => "flush_to_os",
    FlushToDisk => "flush_to_disk",
    PwritevRmwHead => "pwritev_rmw_head",
    PwritevRmwAfterHead => "pwritev_rmw_after_head",
    PwritevRmwTail => "pwritev_rmw_tail",
    PwritevRmwAfterTail => "pwritev_rmw_after_tail",
    Pwritev => "pwritev",
    PwritevZero => "pwritev_zero",
    PwritevDone => "pwritev_done",
    EmptyImagePrepare => "empty_image_prepare",
    L1ShrinkWriteTable => "l1_shrink_write_table",
    L1ShrinkFreeL2Clusters => "l1_shrink_free_l2_clusters",
    CorWrite => "cor_write",
    ClusterAllocSpace => "cluster_alloc_space",
    None => "none",
}

impl DebugEvent {
    /// The event QEMU names `name`.
    pub fn from_name(name: &str) -> Option<DebugEvent> {
        DebugEvent::ALL.iter().copied().find(|e| e.name() == name)
    }

    /// Its position in [`DebugEvent::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_unknown_names_are_none() {
        for &e in DebugEvent::ALL {
            assert_eq!(DebugEvent::from_name(e.name()), Some(e));
            assert_eq!(DebugEvent::ALL[e.index()], e);
        }
        assert_eq!(DebugEvent::ALL.len(), 48);
        assert_eq!(DebugEvent::from_name("l1_grow.alloc_table"), None);
        assert_eq!(DebugEvent::from_name("read_encrypted"), None);
    }
}
