//! Allocation status through a whole backing chain, with QEMU's semantics.
//!
//! Two walks exist because qemu-img uses two: `map` stops at the first layer that
//! says *data or zero*, while `compare`, `measure` and `convert` stop at the first
//! layer where the range is *allocated* (a range past the end of a shorter backing
//! file counts as allocated zeroes there). Both report the same [`BlockState`].

use std::sync::Arc;
use strata_chain::Chain;
use strata_format::qcow2::Qcow2Image;
use strata_format::vmdk::VmdkImage;
use strata_format::{BlockDevice, Status};

use crate::Result;

/// The state of a run of guest bytes, seen through the chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockState {
    pub offset: u64,
    pub len: u64,
    /// Index of the layer that answered (0 is the top).
    pub depth: usize,
    /// Stored in the answering layer (data or zero clusters, or a raw file).
    pub allocated: bool,
    /// Reads as zeroes.
    pub zero: bool,
    /// Backed by data (which may still read as zeroes).
    pub data: bool,
    pub compressed: bool,
    /// Host offset in the answering layer's file, when meaningful.
    pub host_offset: Option<u64>,
    /// The run reaches the end of the answering layer.
    pub eof: bool,
}

impl BlockState {
    /// The flag word qemu-img compares in `compare -s` (bit values are ours; only
    /// equality matters).
    pub fn flags(&self) -> u32 {
        (self.data as u32)
            | (self.zero as u32) << 1
            | (self.host_offset.is_some() as u32) << 2
            | (self.allocated as u32) << 3
            | (self.eof as u32) << 4
            | (self.compressed as u32) << 5
    }
}

/// Where a walk stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Walk {
    /// At the first layer that reports data or zeroes (`qemu-img map`).
    DataOrZero,
    /// At the first layer where the range is allocated (`compare`, `measure`).
    Allocated,
}

/// A chain prepared for status queries.
pub struct ChainStatus {
    layers: Vec<LayerInfo>,
    /// The bottom layer has a backing file that is not walked (see
    /// [`ChainStatus::top_layer`]): its unallocated ranges are not known to
    /// read as zeroes.
    unwalked_backing: bool,
    /// The device guest reads go to when not the top layer: a filter's (its
    /// rules see them) above the node whose allocation the layers tell.
    reader: Option<Arc<dyn BlockDevice>>,
}

struct LayerInfo {
    device: Arc<dyn BlockDevice>,
    /// Ask the file system about data clusters (metadata-preallocated qcow2).
    recurse: bool,
}

impl ChainStatus {
    /// Prepare `chain` (all its layers) for queries.
    pub fn new(chain: &Chain) -> Result<Self> {
        let devices: Vec<_> = chain.layers.iter().map(|l| l.device.clone()).collect();
        Self::from_devices(devices)
    }

    /// Prepare a stack of devices, top first (each attached to the next).
    pub fn from_devices(devices: Vec<Arc<dyn BlockDevice>>) -> Result<Self> {
        let mut layers = Vec::with_capacity(devices.len());
        for device in devices {
            // Metadata preallocation is a qcow2 notion with no capability trait
            // (only this status walk asks about it). A static vdi image and a
            // fixed VHD disk are the same case: QEMU asks their file which
            // stored blocks are holes.
            let recurse = match device.as_any().downcast_ref::<Qcow2Image>() {
                Some(q) => q.metadata_preallocated()?,
                None => {
                    device
                        .as_any()
                        .downcast_ref::<strata_format::vdi::VdiImage>()
                        .is_some_and(|v| v.is_static())
                        || device
                            .as_any()
                            .downcast_ref::<strata_format::vpc::VpcImage>()
                            .is_some_and(|v| v.is_fixed())
                }
            };
            layers.push(LayerInfo { device, recurse });
        }
        Ok(ChainStatus {
            layers,
            unwalked_backing: false,
            reader: None,
        })
    }

    /// The top layer of `chain` alone, as QEMU answers for a format node
    /// reached through another node (a filter's child): its own allocation,
    /// its unallocated ranges neither data nor known zeroes when a backing
    /// file lies below.
    pub fn top_layer(chain: &Chain) -> Result<Self> {
        let mut status = Self::from_devices(vec![chain.top().clone()])?;
        status.unwalked_backing = chain.layers.len() > 1;
        Ok(status)
    }

    /// [`ChainStatus::top_layer`] of the format node `node`, whose guest data
    /// is read through `reader` (a filter over the node, and what is above it).
    pub fn through(reader: Arc<dyn BlockDevice>, node: &Chain) -> Result<Self> {
        let mut status = Self::top_layer(node)?;
        status.reader = Some(reader);
        Ok(status)
    }

    /// The device the guest data is read from: the top layer, or the filter
    /// above the node ([`ChainStatus::through`]).
    pub fn reader(&self) -> &Arc<dyn BlockDevice> {
        self.reader.as_ref().unwrap_or(&self.layers[0].device)
    }

    pub fn virtual_size(&self) -> u64 {
        self.layers[0].device.virtual_size()
    }

    pub fn depth(&self) -> usize {
        self.layers.len()
    }

    /// The device of layer `i` (0 is the top).
    pub fn layer(&self, i: usize) -> &Arc<dyn BlockDevice> {
        &self.layers[i].device
    }

    /// The state of `[offset, offset+len)` from its start: the returned run starts at
    /// `offset` and is between 1 and `len` bytes long. `len` must be at least 1 and
    /// the range inside the top layer.
    pub fn status(&self, offset: u64, len: u64, walk: Walk) -> Result<BlockState> {
        let mut bytes = len;
        let n = self.layers.len();
        for (depth, layer) in self.layers.iter().enumerate() {
            let size = layer.device.virtual_size();
            // Reads as zeroes, not stored in this layer: the starting point of every answer.
            let base = BlockState {
                offset,
                len: bytes,
                depth,
                allocated: false,
                zero: true,
                data: false,
                compressed: false,
                host_offset: None,
                eof: false,
            };
            if offset >= size {
                // Only reachable below the top: a backing file shorter than the
                // layer above reads as zeroes there, as if allocated here.
                return Ok(BlockState {
                    allocated: true,
                    ..base
                });
            }
            let ext = layer
                .device
                .block_status(offset, bytes.min(size - offset))?;
            bytes = ext.len;
            let base = BlockState {
                len: bytes,
                eof: offset + bytes == size,
                ..base
            };
            match ext.status {
                Status::Data {
                    host_offset,
                    compressed,
                } => {
                    let mut st = BlockState {
                        allocated: true,
                        zero: false,
                        data: true,
                        compressed,
                        host_offset,
                        ..base
                    };
                    if let (true, Some(h), false) = (layer.recurse, host_offset, compressed) {
                        self.refine_from_file(layer, h, &mut st)?;
                    } else if let (Some(h), false) = (host_offset, compressed) {
                        // A vmdk's flat extent: QEMU asks the extent's file.
                        let flat = layer
                            .device
                            .as_any()
                            .downcast_ref::<VmdkImage>()
                            .and_then(|v| v.flat_file_at(offset));
                        if let Some(file) = flat {
                            refine_in(file.as_ref(), size, h, &mut st)?;
                        }
                    }
                    return Ok(st);
                }
                Status::Zero { host_offset } => {
                    return Ok(BlockState {
                        allocated: true,
                        host_offset,
                        ..base
                    })
                }
                Status::Unallocated if depth + 1 == n && self.unwalked_backing => {
                    return Ok(BlockState {
                        zero: false,
                        ..base
                    });
                }
                Status::Unallocated if depth + 1 == n => {
                    // A cluster allocated around unallocated subclusters still has a
                    // host offset to report.
                    // Clusters reserved around unallocated subclusters exist only in
                    // qcow2 with extended L2 entries: a qcow2 inspection, no capability.
                    if let Some(q) = layer.device.as_any().downcast_ref::<Qcow2Image>() {
                        if let Some((h, run)) = q.reserved_host_offset(offset)? {
                            let len = bytes.min(run);
                            return Ok(BlockState {
                                host_offset: Some(h),
                                len,
                                eof: offset + len == size,
                                ..base
                            });
                        }
                    }
                    return Ok(base);
                }
                Status::Unallocated => {
                    let below = self.layers[depth + 1].device.virtual_size();
                    if offset >= below && walk == Walk::DataOrZero {
                        return Ok(base);
                    }
                }
            }
        }
        unreachable!("the bottom layer always answers")
    }

    /// A data run of a metadata-preallocated qcow2 layer: holes in its file read as
    /// zeroes (QEMU asks the file system the same question).
    fn refine_from_file(&self, layer: &LayerInfo, host: u64, st: &mut BlockState) -> Result<()> {
        let Some(storage) = layer.device.host_file() else {
            return Ok(());
        };
        refine_in(storage.as_ref(), layer.device.virtual_size(), host, st)
    }
}

/// Refine a data run at `host` of `storage` by the file system's holes (they
/// read as zeroes); `size` is the answering layer's virtual size.
fn refine_in(
    storage: &dyn strata_storage::Storage,
    size: u64,
    host: u64,
    st: &mut BlockState,
) -> Result<()> {
    let file_len = storage.size()?;
    if host >= file_len {
        st.zero = true;
        return Ok(());
    }
    let (is_data, n) = storage.probe_data(host, st.len)?;
    if n > 0 {
        st.len = st.len.min(n);
    }
    if !is_data {
        st.zero = true;
    }
    st.eof = st.offset + st.len == size;
    Ok(())
}
