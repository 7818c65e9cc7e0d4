//! Writing a new VHDX image as `qemu-img create -f vhdx` lays it out:
//!
//! ```text
//! 0      file identifier ("vhdxfile", creator)
//! 64K    header 1, 128K header 2 (sequence numbers n and n+1)
//! 192K   region table 1, 256K region table 2 (BAT and metadata regions)
//! 1M     log (log_size)
//! then   BAT (rounded up to 1 MiB), metadata region (1 MiB), 5 MiB gap, data
//! ```

use super::layout::*;
use super::CreateOptions;
use crate::{Error, Result};
use strata_storage::Storage;

/// The options after QEMU's rounding and checks, and the layout they give.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    pub size: u64,
    pub log_size: u64,
    pub block_size: u64,
    pub bat_offset: u64,
    pub bat_length: u64,
    pub metadata_offset: u64,
    pub data_offset: u64,
}

/// Round and check the options as QEMU does (size to 512 bytes, log and
/// block sizes up to whole MiB, block size 0 = chosen from the size, block
/// size capped at 256 MiB), with QEMU's refusals.
pub fn plan(size: u64, opts: &CreateOptions) -> Result<Plan> {
    let too_large = || Error::invalid_argument("Image size too large; max of 64TB");
    let size = size.checked_next_multiple_of(512).ok_or_else(too_large)?;
    if size > MAX_IMAGE_SIZE {
        return Err(too_large());
    }
    let log_size = opts
        .log_size
        .checked_next_multiple_of(MIB)
        .ok_or_else(|| Error::invalid_argument("Log size must be smaller than 4 GB"))?;
    if log_size > u64::from(u32::MAX) {
        return Err(Error::invalid_argument(
            "Log size must be smaller than 4 GB",
        ));
    }
    if log_size < MIB {
        return Err(Error::invalid_argument(
            "Log size must be a multiple of 1 MB",
        ));
    }
    let mut block_size = opts
        .block_size
        .checked_next_multiple_of(MIB)
        .unwrap_or(BLOCK_SIZE_MAX)
        .min(BLOCK_SIZE_MAX);
    if block_size == 0 {
        block_size = if size > 32 << 40 {
            64 * MIB
        } else if size > 100 << 30 {
            32 * MIB
        } else if size > 1 << 30 {
            16 * MIB
        } else {
            8 * MIB
        };
    }
    if !block_size.is_power_of_two() {
        return Err(Error::invalid_argument("Block size must be a power of two"));
    }
    let ratio = chunk_ratio(512, block_size);
    let entries = bat_entries(size, block_size, ratio);
    let bat_length = (entries * 8).next_multiple_of(MIB);
    let bat_offset = (MIB + log_size).next_multiple_of(MIB);
    let metadata_offset = (bat_offset + bat_length).next_multiple_of(MIB);
    Ok(Plan {
        size,
        log_size,
        block_size,
        bat_offset,
        bat_length,
        metadata_offset,
        data_offset: bat_offset + bat_length + 5 * MIB,
    })
}

/// Write the image on the (empty) `storage`.
pub fn create(storage: &dyn Storage, size: u64, opts: &CreateOptions) -> Result<()> {
    let p = plan(size, opts)?;
    storage.set_size(0)?;

    // File identifier: signature and creator (UTF-16LE).
    let mut id = b"vhdxfile".to_vec();
    for u in concat!("strata v", env!("CARGO_PKG_VERSION")).encode_utf16() {
        id.extend_from_slice(&u.to_le_bytes());
    }
    storage.write_at(&id, 0)?;

    // Headers: the second one current (sequence number one higher).
    let seq = u64::from(u32::from_le_bytes(
        random_guid()[..4].try_into().unwrap_or([0; 4]),
    ));
    let mut hdr = Header {
        sequence_number: seq,
        file_write_guid: random_guid(),
        data_write_guid: random_guid(),
        log_guid: [0; 16],
        log_version: 0,
        version: 1,
        log_length: u32::try_from(p.log_size)
            .map_err(|_| Error::invalid_argument("Log size must be smaller than 4 GB"))?,
        log_offset: MIB,
    };
    for off in [HEADER1_OFFSET, HEADER2_OFFSET] {
        let mut area = vec![0u8; HEADER_SIZE];
        hdr.encode_into(&mut area);
        storage.write_at(&area[..HEADER_STRUCT_LEN], off)?;
        hdr.sequence_number += 1;
    }

    // BAT (and the file's length).
    if opts.fixed {
        storage.set_size(p.data_offset + p.size)?;
    } else {
        storage.set_size(p.data_offset)?;
    }
    if opts.fixed || opts.block_state_zero {
        let state = if opts.block_state_zero {
            PAYLOAD_BLOCK_ZERO
        } else {
            PAYLOAD_BLOCK_FULLY_PRESENT
        };
        let ratio_bits = chunk_ratio(512, p.block_size).trailing_zeros();
        let mut bat = vec![0u8; crate::units::index(p.bat_length)];
        let mut block = 0u64;
        while block * p.block_size < p.size {
            let idx = crate::units::index(block + (block >> ratio_bits));
            let entry = if state == PAYLOAD_BLOCK_FULLY_PRESENT {
                (p.data_offset + block * p.block_size).next_multiple_of(MIB) | state
            } else {
                state
            };
            bat[idx * 8..idx * 8 + 8].copy_from_slice(&entry.to_le_bytes());
            block += 1;
        }
        storage.write_at(&bat, p.bat_offset)?;
    }

    // Region tables.
    let mut rt = vec![0u8; TABLE_SIZE];
    rt[..4].copy_from_slice(REGION_SIGNATURE);
    rt[8..12].copy_from_slice(&2u32.to_le_bytes());
    let bat_len = u32::try_from(p.bat_length)
        .map_err(|_| Error::invalid_argument("Image size too large; max of 64TB"))?;
    RegionEntry {
        guid: BAT_GUID,
        file_offset: p.bat_offset,
        length: bat_len,
        required: false,
    }
    .encode(&mut rt[16..48]);
    RegionEntry {
        guid: METADATA_GUID,
        file_offset: p.metadata_offset,
        length: 1 << 20,
        required: false,
    }
    .encode(&mut rt[48..80]);
    set_checksum(&mut rt, 4);
    storage.write_at(&rt, REGION_TABLE_OFFSET)?;
    storage.write_at(&rt, REGION_TABLE2_OFFSET)?;

    // Metadata table and items.
    let mut mt = vec![0u8; TABLE_SIZE];
    mt[..8].copy_from_slice(METADATA_SIGNATURE);
    mt[10..12].copy_from_slice(&5u16.to_le_bytes());
    let items: [(Guid, u32, u32); 5] = [
        (FILE_PARAM_GUID, 8, META_IS_REQUIRED),
        (
            VIRTUAL_SIZE_GUID,
            8,
            META_IS_REQUIRED | META_IS_VIRTUAL_DISK,
        ),
        (PAGE83_GUID, 16, META_IS_REQUIRED | META_IS_VIRTUAL_DISK),
        (
            LOGICAL_SECTOR_GUID,
            4,
            META_IS_REQUIRED | META_IS_VIRTUAL_DISK,
        ),
        (PHYS_SECTOR_GUID, 4, META_IS_REQUIRED | META_IS_VIRTUAL_DISK),
    ];
    let mut offset = 64 << 10;
    for (i, (item_id, length, flags)) in items.into_iter().enumerate() {
        MetadataEntry {
            item_id,
            offset,
            length,
            flags,
        }
        .encode(&mut mt[32 + i * 32..64 + i * 32]);
        offset += length;
    }
    storage.write_at(&mt, p.metadata_offset)?;
    let mut data = Vec::with_capacity(40);
    data.extend_from_slice(&u32::try_from(p.block_size).unwrap_or(0).to_le_bytes());
    let params = if opts.fixed {
        PARAMS_LEAVE_BLOCKS_ALLOCATED
    } else {
        0
    };
    data.extend_from_slice(&params.to_le_bytes());
    data.extend_from_slice(&p.size.to_le_bytes());
    data.extend_from_slice(&random_guid());
    data.extend_from_slice(&512u32.to_le_bytes());
    data.extend_from_slice(&512u32.to_le_bytes());
    storage.write_at(&data, p.metadata_offset + (64 << 10))?;
    storage.flush()?;
    Ok(())
}
