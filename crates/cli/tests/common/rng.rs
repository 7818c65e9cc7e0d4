//! The random usage sweeps' generators: sequences that depend on the seed
//! alone (no crate, no OS randomness), so a sweep is the same on every run and
//! a failing seed can be replayed. Two step functions exist because sweeps
//! were written with each; changing a sweep's step changes what it draws.

/// Draws built on a generator's 64-bit step.
pub trait Draw {
    fn next(&mut self) -> u64;
    /// A number in `0..n`.
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    /// True one time in `n`.
    fn one_in(&mut self, n: usize) -> bool {
        self.below(n) == 0
    }
    /// True `pct` times in 100.
    fn odds(&mut self, pct: u64) -> bool {
        self.next() % 100 < pct
    }
    fn pick<'a>(&mut self, from: &[&'a str]) -> &'a str {
        from[self.below(from.len())]
    }
    /// Put `v` in a random order.
    fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            v.swap(i, self.below(i + 1));
        }
    }
}

/// xorshift64*; the seed must not be 0.
pub struct Rng(pub u64);

impl Draw for Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// Plain xorshift64; the seed must not be 0.
pub struct XorShift(pub u64);

impl Draw for XorShift {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
}

/// A sweep's setting `name` (`SEED`, `N`, ...) from the environment:
/// `STRATA_SWEEP_<name>` when set, else `SWEEP_<name>`, else `default`. The
/// value is a decimal number; anything else panics (a sweep run with a seed it
/// did not read would look like a pass).
pub fn sweep_var(name: &str, default: u64) -> u64 {
    ["STRATA_SWEEP_", "SWEEP_"]
        .iter()
        .find_map(|p| std::env::var(format!("{p}{name}")).ok())
        .map_or(default, |v| {
            v.parse()
                .unwrap_or_else(|_| panic!("sweep setting {name}={v:?} is not a number"))
        })
}
