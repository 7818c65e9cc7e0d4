//! The LUKS1 header as QEMU writes it (version 1.2.1 of the on-disk format): the
//! partition header, eight key slots, the anti-forensic key material, and the
//! master key digest that tells a right password from a wrong one.

use super::afsplit;
use super::cipher::{CipherAlg, CipherMode, IvGenAlg, SectorCipher};
use super::{random, HashAlg, SECTOR_SIZE};
use crate::units::index;
use crate::{Error, ErrorKind, Result};
use std::time::{Duration, Instant};

pub const MAGIC: [u8; 6] = *b"LUKS\xba\xbe";
/// Bytes of the partition header with its key slots.
pub const HEADER_LEN: usize = 592;
pub const NUM_KEY_SLOTS: usize = 8;
pub const STRIPES: u32 = 4000;
const DIGEST_LEN: usize = 20;
const SALT_LEN: usize = 32;
/// Where the first key material starts, and the alignment of each slot's material.
const KEY_SLOT_OFFSET: u64 = 4096;
const SLOT_ENABLED: u32 = 0x00ac_71f3;
const SLOT_DISABLED: u32 = 0x0000_dead;
const MIN_ITERS: u32 = 1000;
/// The most PBKDF2 iterations an unlock runs for one key slot or for the
/// master key digest. QEMU has no bound (a hostile header's 2^32 - 1 keeps it
/// busy for the better part of an hour per slot); this one is about thirty
/// times what a default 2-second `iter-time` gives on a fast machine, so a
/// header past it is refused before any work, as [`Error`] of kind
/// [`ErrorKind::Unsupported`].
pub const MAX_UNLOCK_ITERS: u32 = 1 << 27;

/// One key slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeySlot {
    pub active: bool,
    pub iterations: u32,
    pub salt: [u8; SALT_LEN],
    /// First sector of the key material.
    pub key_offset: u32,
    pub stripes: u32,
}

/// A validated LUKS1 header, with its algorithms resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LuksHeader {
    pub cipher_alg: CipherAlg,
    pub cipher_mode: CipherMode,
    pub ivgen_alg: IvGenAlg,
    /// The hash named after the IV generator (`essiv:sha256`), if any.
    pub ivgen_hash_alg: Option<HashAlg>,
    pub hash_alg: HashAlg,
    /// Sectors before the payload (for qcow2: the size of the LUKS area).
    pub payload_offset: u32,
    pub key_bytes: u32,
    pub master_key_digest: [u8; DIGEST_LEN],
    pub master_key_salt: [u8; SALT_LEN],
    pub master_key_iterations: u32,
    pub uuid: String,
    pub slots: [KeySlot; NUM_KEY_SLOTS],
    /// The cipher and mode strings as stored (written back unchanged).
    cipher_name_raw: String,
    cipher_mode_raw: String,
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}
fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

/// A NUL-terminated string field, or `None` when the field has no NUL.
fn cstr(field: &[u8]) -> Option<String> {
    let n = field.iter().position(|&c| c == 0)?;
    Some(String::from_utf8_lossy(&field[..n]).into_owned())
}

/// Sectors the material of a slot with `stripes` stripes takes, rounded up to the
/// key-slot alignment.
fn material_sectors(key_bytes: u32, stripes: u32) -> u64 {
    let bytes = u64::from(key_bytes) * u64::from(stripes);
    let align = KEY_SLOT_OFFSET / SECTOR_SIZE;
    bytes.div_ceil(SECTOR_SIZE).next_multiple_of(align)
}

impl LuksHeader {
    /// Parse and validate the first [`HEADER_LEN`] bytes of a LUKS area, with
    /// QEMU's checks and messages, in its order.
    pub fn parse(b: &[u8]) -> Result<LuksHeader> {
        if b.len() < HEADER_LEN {
            return Err(Error::invalid("Volume is not in LUKS format"));
        }
        if b[..6] != MAGIC {
            return Err(Error::invalid("Volume is not in LUKS format"));
        }
        let version = be16(b, 6);
        if version != 1 {
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!("LUKS version {version} is not supported"),
            ));
        }
        let cipher_name = cstr(&b[8..40])
            .ok_or_else(|| Error::invalid("LUKS header cipher name is not NUL terminated"))?;
        let cipher_mode_raw = cstr(&b[40..72])
            .ok_or_else(|| Error::invalid("LUKS header cipher mode is not NUL terminated"))?;
        let hash_spec = cstr(&b[72..104])
            .ok_or_else(|| Error::invalid("LUKS header hash spec is not NUL terminated"))?;
        let payload_offset = be32(b, 104);
        let key_bytes = be32(b, 108);
        let master_key_iterations = be32(b, 164);
        let header_sectors = KEY_SLOT_OFFSET / SECTOR_SIZE;
        if u64::from(payload_offset) < header_sectors {
            return Err(Error::invalid(
                "LUKS payload is overlapping with the header",
            ));
        }
        if master_key_iterations == 0 {
            return Err(Error::invalid("LUKS key iteration count is zero"));
        }
        let mut slots = [KeySlot {
            active: false,
            iterations: 0,
            salt: [0; SALT_LEN],
            key_offset: 0,
            stripes: 0,
        }; NUM_KEY_SLOTS];
        let mut raw_active = [0u32; NUM_KEY_SLOTS];
        for (i, s) in slots.iter_mut().enumerate() {
            let at = 208 + 48 * i;
            raw_active[i] = be32(b, at);
            s.active = raw_active[i] == SLOT_ENABLED;
            s.iterations = be32(b, at + 4);
            s.salt.copy_from_slice(&b[at + 8..at + 40]);
            s.key_offset = be32(b, at + 40);
            s.stripes = be32(b, at + 44);
        }
        for (i, s) in slots.iter().enumerate() {
            if s.stripes != STRIPES {
                // QEMU prints the count as a signed int (0xffffffff as -1).
                return Err(Error::invalid(format!(
                    "Keyslot {i} is corrupted (stripes {} != {STRIPES})",
                    s.stripes as i32
                )));
            }
            if raw_active[i] != SLOT_ENABLED && raw_active[i] != SLOT_DISABLED {
                return Err(Error::invalid(format!(
                    "Keyslot {i} state (active/disable) is corrupted"
                )));
            }
            if s.active && s.iterations == 0 {
                return Err(Error::invalid(format!(
                    "Keyslot {i} iteration count is zero"
                )));
            }
            let start = u64::from(s.key_offset);
            let len = material_sectors(key_bytes, s.stripes);
            if start < header_sectors {
                return Err(Error::invalid(format!(
                    "Keyslot {i} is overlapping with the LUKS header"
                )));
            }
            if start + len > u64::from(payload_offset) {
                return Err(Error::invalid(format!(
                    "Keyslot {i} is overlapping with the encrypted payload"
                )));
            }
            for (j, t) in slots.iter().enumerate().skip(i + 1) {
                let s2 = u64::from(t.key_offset);
                let l2 = material_sectors(key_bytes, t.stripes);
                if start < s2 + l2 && s2 < start + len {
                    return Err(Error::invalid(format!(
                        "Keyslots {i} and {j} are overlapping in the header"
                    )));
                }
            }
        }
        // The algorithms: "<mode>-<ivgen>[:<ivhash>]".
        let (mode_name, ivspec) = cipher_mode_raw.split_once('-').ok_or_else(|| {
            Error::invalid(format!(
                "Unexpected cipher mode string format '{cipher_mode_raw}'"
            ))
        })?;
        let (ivgen_name, ivhash_name) = match ivspec.split_once(':') {
            Some((g, h)) => (g, Some(h)),
            None => (ivspec, None),
        };
        let ivgen_hash_alg = ivhash_name.map(HashAlg::parse).transpose()?;
        let cipher_mode = CipherMode::parse(mode_name)?;
        let per_cipher = if cipher_mode == CipherMode::Xts {
            key_bytes / 2
        } else {
            key_bytes
        };
        let cipher_alg = (cipher_name == "aes")
            .then(|| CipherAlg::aes_with_key_len(index(u64::from(per_cipher))))
            .flatten()
            .ok_or_else(|| {
                let known = ["aes", "cast5", "serpent", "twofish", "sm4"];
                let kind = if known.contains(&cipher_name.as_str()) && cipher_name != "aes" {
                    ErrorKind::Unsupported
                } else {
                    ErrorKind::Invalid
                };
                Error::new(
                    kind,
                    format!(
                        "Algorithm '{cipher_name}' with key size {per_cipher} bytes not supported"
                    ),
                )
            })?;
        let hash_alg = HashAlg::parse(&hash_spec)?;
        let ivgen_alg = IvGenAlg::parse(ivgen_name)?;
        if ivgen_alg == IvGenAlg::Essiv && ivgen_hash_alg.is_none() {
            return Err(Error::invalid("Missing IV generator hash specification"));
        }
        let mut master_key_digest = [0; DIGEST_LEN];
        master_key_digest.copy_from_slice(&b[112..132]);
        let mut master_key_salt = [0; SALT_LEN];
        master_key_salt.copy_from_slice(&b[132..164]);
        let uuid = String::from_utf8_lossy(&b[168..208])
            .trim_end_matches('\0')
            .to_string();
        Ok(LuksHeader {
            cipher_alg,
            cipher_mode,
            ivgen_alg,
            ivgen_hash_alg,
            hash_alg,
            payload_offset,
            key_bytes,
            master_key_digest,
            master_key_salt,
            master_key_iterations,
            uuid,
            slots,
            cipher_name_raw: cipher_name,
            cipher_mode_raw,
        })
    }

    /// The header's [`HEADER_LEN`] bytes.
    pub fn serialize(&self) -> Vec<u8> {
        let mut b = vec![0u8; HEADER_LEN];
        b[..6].copy_from_slice(&MAGIC);
        b[6..8].copy_from_slice(&1u16.to_be_bytes());
        let put =
            |b: &mut [u8], at: usize, s: &str| b[at..at + s.len()].copy_from_slice(s.as_bytes());
        put(&mut b, 8, &self.cipher_name_raw);
        put(&mut b, 40, &self.cipher_mode_raw);
        put(&mut b, 72, self.hash_alg.name());
        b[104..108].copy_from_slice(&self.payload_offset.to_be_bytes());
        b[108..112].copy_from_slice(&self.key_bytes.to_be_bytes());
        b[112..132].copy_from_slice(&self.master_key_digest);
        b[132..164].copy_from_slice(&self.master_key_salt);
        b[164..168].copy_from_slice(&self.master_key_iterations.to_be_bytes());
        put(&mut b, 168, &self.uuid);
        for (i, s) in self.slots.iter().enumerate() {
            let at = slot_descriptor_offset(i);
            b[at..at + 48].copy_from_slice(&s.serialize());
        }
        b
    }

    /// Bytes of the whole LUKS area (header and key material).
    pub fn area_len(&self) -> u64 {
        u64::from(self.payload_offset) * SECTOR_SIZE
    }

    fn cipher_for(&self, key: &[u8]) -> Result<SectorCipher> {
        SectorCipher::new(
            self.cipher_alg,
            self.cipher_mode,
            self.ivgen_alg,
            self.ivgen_hash_alg,
            key,
        )
    }

    /// Unlock the master key with `password`, trying each active slot in turn;
    /// `read(offset, buf)` reads the LUKS area. Returns the data cipher.
    pub fn unlock(
        &self,
        password: &[u8],
        read: &mut dyn FnMut(u64, &mut [u8]) -> Result<()>,
    ) -> Result<SectorCipher> {
        let key = self.find_key(password, read)?;
        self.cipher_for(&key)
    }

    /// The master key `password` unlocks from the first active slot it opens
    /// (QEMU's error when none does).
    pub fn find_key(
        &self,
        password: &[u8],
        read: &mut dyn FnMut(u64, &mut [u8]) -> Result<()>,
    ) -> Result<Vec<u8>> {
        for i in 0..NUM_KEY_SLOTS {
            if let Some(key) = self.load_key(i, password, read)? {
                return Ok(key);
            }
        }
        Err(Error::new(
            ErrorKind::Key,
            "Invalid password, cannot unlock any keyslot",
        ))
    }

    /// The master key slot `slot` gives for `password`: `None` when the slot is
    /// inactive or the password is not its own (the master key digest tells; a
    /// damaged key material area reads as a wrong password, never a wrong key).
    pub fn load_key(
        &self,
        slot: usize,
        password: &[u8],
        read: &mut dyn FnMut(u64, &mut [u8]) -> Result<()>,
    ) -> Result<Option<Vec<u8>>> {
        let s = &self.slots[slot];
        if !s.active {
            return Ok(None);
        }
        too_many_iterations(&format!("Keyslot {slot}"), s.iterations)?;
        too_many_iterations("The LUKS master key digest", self.master_key_iterations)?;
        let klen = index(u64::from(self.key_bytes));
        let mut slot_key = vec![0u8; klen];
        self.hash_alg
            .pbkdf2(password, &s.salt, s.iterations, &mut slot_key);
        let mut material = vec![0u8; klen * index(u64::from(s.stripes))];
        read(u64::from(s.key_offset) * SECTOR_SIZE, &mut material)?;
        self.cipher_for(&slot_key)?.decrypt(0, &mut material);
        let key = afsplit::merge(self.hash_alg, &material, klen, index(u64::from(s.stripes)));
        Ok(self.is_master_key(&key).then_some(key))
    }

    /// Whether `key` is the master key (its PBKDF2 digest is the header's).
    fn is_master_key(&self, key: &[u8]) -> bool {
        let mut digest = [0u8; DIGEST_LEN];
        self.hash_alg.pbkdf2(
            key,
            &self.master_key_salt,
            self.master_key_iterations,
            &mut digest,
        );
        digest == self.master_key_digest
    }

    /// Slot `slot` made to hold `master` for `password` with `iterations` of
    /// PBKDF2 and a fresh random salt: the slot's descriptor (active) and its
    /// encrypted, anti-forensically split key material, to be stored at
    /// `key_offset` sectors into the area.
    pub fn seal_key(
        &self,
        slot: usize,
        password: &[u8],
        master: &[u8],
        iterations: u32,
    ) -> Result<(KeySlot, Vec<u8>)> {
        let klen = index(u64::from(self.key_bytes));
        let mut s = self.slots[slot];
        random(&mut s.salt)?;
        s.iterations = iterations;
        s.active = true;
        let mut slot_key = vec![0u8; klen];
        self.hash_alg
            .pbkdf2(password, &s.salt, s.iterations, &mut slot_key);
        let stripes = index(u64::from(s.stripes));
        let mut noise = vec![0u8; klen * (stripes - 1)];
        random(&mut noise)?;
        let mut material = afsplit::split(self.hash_alg, master, stripes, &noise);
        self.cipher_for(&slot_key)?.encrypt(0, &mut material);
        Ok((s, material))
    }

    /// Bytes of one slot's key material.
    pub fn material_len(&self, slot: usize) -> u64 {
        u64::from(self.key_bytes) * u64::from(self.slots[slot].stripes)
    }
}

/// Refuse an iteration count past [`MAX_UNLOCK_ITERS`] for `what`.
fn too_many_iterations(what: &str, iterations: u32) -> Result<()> {
    if iterations > MAX_UNLOCK_ITERS {
        return Err(Error::new(
            ErrorKind::Unsupported,
            format!(
                "{what} asks for {iterations} PBKDF2 iterations, more than the \
                 {MAX_UNLOCK_ITERS} strata runs to unlock an image"
            ),
        ));
    }
    Ok(())
}

/// Where slot `i`'s 48-byte descriptor lies in the header.
pub fn slot_descriptor_offset(i: usize) -> usize {
    208 + 48 * i
}

impl KeySlot {
    /// The descriptor's 48 bytes as the header stores them.
    pub fn serialize(&self) -> [u8; 48] {
        let mut b = [0u8; 48];
        let active = if self.active {
            SLOT_ENABLED
        } else {
            SLOT_DISABLED
        };
        b[..4].copy_from_slice(&active.to_be_bytes());
        b[4..8].copy_from_slice(&self.iterations.to_be_bytes());
        b[8..40].copy_from_slice(&self.salt);
        b[40..44].copy_from_slice(&self.key_offset.to_be_bytes());
        b[44..48].copy_from_slice(&self.stripes.to_be_bytes());
        b
    }

    /// The slot erased as QEMU erases one: inactive, no salt, no iterations;
    /// where its material lies stays.
    pub fn erased(&self) -> KeySlot {
        KeySlot {
            active: false,
            iterations: 0,
            salt: [0; SALT_LEN],
            ..*self
        }
    }
}

/// What `encrypt.*` options choose for a new LUKS area (QEMU's defaults).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LuksCreateOptions {
    pub cipher_alg: CipherAlg,
    pub cipher_mode: CipherMode,
    pub ivgen_alg: IvGenAlg,
    pub ivgen_hash_alg: Option<HashAlg>,
    pub hash_alg: HashAlg,
    /// Milliseconds of PBKDF2 work each unlock should cost.
    pub iter_time_ms: u64,
}

impl Default for LuksCreateOptions {
    fn default() -> Self {
        LuksCreateOptions {
            cipher_alg: CipherAlg::Aes256,
            cipher_mode: CipherMode::Xts,
            ivgen_alg: IvGenAlg::Plain64,
            ivgen_hash_alg: None,
            hash_alg: HashAlg::Sha256,
            iter_time_ms: 2000,
        }
    }
}

/// PBKDF2 iterations of `hash` (for `out_len` bytes) this machine runs per
/// second, measured on a run of about `budget_ms` milliseconds (1 to 100).
fn pbkdf2_rate(hash: HashAlg, out_len: usize, budget_ms: u64) -> u64 {
    let mut out = vec![0u8; out_len];
    let mut n: u32 = 1 << 10;
    let budget = Duration::from_millis(budget_ms.clamp(1, 100));
    let elapsed = loop {
        let t = Instant::now();
        hash.pbkdf2(b"benchmark", &[0u8; SALT_LEN], n, &mut out);
        let e = t.elapsed();
        if e >= budget || n >= 1 << 30 {
            break e;
        }
        n *= 2;
    };
    let rate = u128::from(n) * 1_000_000 / elapsed.as_micros().max(1);
    u64::try_from(rate).unwrap_or(u64::MAX)
}

/// PBKDF2 iterations of `hash` that take about `ms` milliseconds here, measured
/// on a short run (at least `MIN_ITERS`).
fn iterations_for(hash: HashAlg, out_len: usize, ms: u64) -> Result<u32> {
    let per_ms = u128::from(pbkdf2_rate(hash, out_len, ms)) / 1000;
    let iters = per_ms.saturating_mul(u128::from(ms));
    let iters = u64::try_from(iters)
        .unwrap_or(u64::MAX)
        .max(u64::from(MIN_ITERS));
    u32::try_from(iters).map_err(|_| {
        Error::invalid_argument(format!("PBKDF iterations {iters} larger than {}", u32::MAX))
    })
}

/// The PBKDF2 iterations a key slot added to `h` gets for an unlock time of
/// `iter_time_ms` (`encrypt.iter-time`), scaled from the rate measured here
/// and bounded as QEMU bounds them: a time whose product with the rate
/// overflows 64 bits, or a count past 32 bits, is refused in QEMU's words; the
/// count is at least `MIN_ITERS` (a time of 0 gives that).
pub fn slot_iterations(h: &LuksHeader, iter_time_ms: u64) -> Result<u32> {
    let klen = index(u64::from(h.key_bytes));
    let rate = pbkdf2_rate(h.hash_alg, klen, iter_time_ms);
    let range = |what: String| {
        Error::new(
            ErrorKind::OutOfRange,
            format!("{what}: Numerical result out of range"),
        )
    };
    if iter_time_ms != 0 && rate > u64::MAX / iter_time_ms {
        return Err(range(format!("PBKDF iterations {rate} too large to scale")));
    }
    let iters = rate * iter_time_ms / 1000;
    let iters = u32::try_from(iters)
        .map_err(|_| range(format!("PBKDF iterations {iters} larger than {}", u32::MAX)))?;
    Ok(iters.max(MIN_ITERS))
}

/// Bytes of the LUKS area [`create`] makes for `opts`: the header sectors, then
/// eight slots of key material, each aligned to 4 KiB.
pub fn area_len_for(opts: &LuksCreateOptions) -> u64 {
    payload_sectors(key_bytes_for(opts)) * SECTOR_SIZE
}

fn key_bytes_for(opts: &LuksCreateOptions) -> u32 {
    u32::try_from(opts.cipher_mode.key_len(opts.cipher_alg)).expect("a key of at most 64 bytes")
}

/// The first payload sector of a new area whose keys are `key_bytes` long.
fn payload_sectors(key_bytes: u32) -> u64 {
    KEY_SLOT_OFFSET / SECTOR_SIZE + material_sectors(key_bytes, STRIPES) * NUM_KEY_SLOTS as u64
}

/// A new LUKS area: the header, its one active key slot (slot 0, unlocked by
/// `password`) and a random master key. Returns the header, the area's bytes
/// (`area_len()` of them) and the data cipher.
pub fn create(
    opts: &LuksCreateOptions,
    password: &[u8],
) -> Result<(LuksHeader, Vec<u8>, SectorCipher)> {
    let klen = opts.cipher_mode.key_len(opts.cipher_alg);
    let key_bytes = key_bytes_for(opts);
    let mut master = vec![0u8; klen];
    random(&mut master)?;
    let mut master_key_salt = [0u8; SALT_LEN];
    random(&mut master_key_salt)?;
    let mut u = [0u8; 16];
    random(&mut u)?;
    u[6] = (u[6] & 0x0f) | 0x40;
    u[8] = (u[8] & 0x3f) | 0x80;
    let hex: String = u.iter().map(|b| format!("{b:02x}")).collect();
    let uuid = format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    );
    // As QEMU: the digest check costs an eighth of the unlock time.
    let mk_iters = iterations_for(opts.hash_alg, DIGEST_LEN, opts.iter_time_ms)?;
    let mk_iters = (mk_iters / 8).max(MIN_ITERS);
    let slot_iters = iterations_for(opts.hash_alg, klen, opts.iter_time_ms)?;
    let mat_sectors = material_sectors(key_bytes, STRIPES);
    let first = KEY_SLOT_OFFSET / SECTOR_SIZE;
    let mut slots = [KeySlot {
        active: false,
        iterations: 0,
        salt: [0; SALT_LEN],
        key_offset: 0,
        stripes: STRIPES,
    }; NUM_KEY_SLOTS];
    for (i, s) in slots.iter_mut().enumerate() {
        s.key_offset = u32::try_from(first + mat_sectors * i as u64).expect("small");
    }
    let payload_offset = u32::try_from(payload_sectors(key_bytes)).expect("small");
    let mut master_key_digest = [0u8; DIGEST_LEN];
    opts.hash_alg
        .pbkdf2(&master, &master_key_salt, mk_iters, &mut master_key_digest);
    let mode_raw = match opts.ivgen_hash_alg {
        Some(h) => format!(
            "{}-{}:{}",
            opts.cipher_mode.name(),
            opts.ivgen_alg.name(),
            h.name()
        ),
        None => format!("{}-{}", opts.cipher_mode.name(), opts.ivgen_alg.name()),
    };
    let mut h = LuksHeader {
        cipher_alg: opts.cipher_alg,
        cipher_mode: opts.cipher_mode,
        ivgen_alg: opts.ivgen_alg,
        ivgen_hash_alg: opts.ivgen_hash_alg,
        hash_alg: opts.hash_alg,
        payload_offset,
        key_bytes,
        master_key_digest,
        master_key_salt,
        master_key_iterations: mk_iters,
        uuid,
        slots,
        cipher_name_raw: "aes".to_string(),
        cipher_mode_raw: mode_raw,
    };
    // Slot 0: the split master key, encrypted with the password's key.
    let (slot0, material) = h.seal_key(0, password, &master, slot_iters)?;
    h.slots[0] = slot0;
    let mut area = vec![0u8; index(h.area_len())];
    area[..HEADER_LEN].copy_from_slice(&h.serialize());
    let at = index(u64::from(h.slots[0].key_offset) * SECTOR_SIZE);
    area[at..at + material.len()].copy_from_slice(&material);
    let cipher = h.cipher_for(&master)?;
    Ok((h, area, cipher))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quick() -> LuksCreateOptions {
        LuksCreateOptions {
            iter_time_ms: 1,
            ..Default::default()
        }
    }

    #[test]
    fn a_created_area_parses_back_and_unlocks_only_with_its_password() {
        let (h, area, cipher) = create(&quick(), b"secret").unwrap();
        assert_eq!(h.area_len(), 2068480);
        assert_eq!(h.slots[1].key_offset, 512);
        let parsed = LuksHeader::parse(&area).unwrap();
        assert_eq!(parsed, h);
        let mut read = |off: u64, buf: &mut [u8]| {
            let o = index(off);
            buf.copy_from_slice(&area[o..o + buf.len()]);
            Ok(())
        };
        let unlocked = parsed.unlock(b"secret", &mut read).unwrap();
        let mut a = vec![5u8; 1024];
        let mut b = a.clone();
        cipher.encrypt(9, &mut a);
        unlocked.encrypt(9, &mut b);
        assert_eq!(a, b);
        let e = parsed.unlock(b"wrong", &mut read).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Key);
        assert_eq!(e.message(), "Invalid password, cannot unlock any keyslot");
    }
}
