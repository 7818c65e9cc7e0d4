//! Random 4 KiB reads through an image and its backing chain, for
//! scripts/bench-chain.sh: `chain_reads IMAGE COUNT [SEED]` opens IMAGE with its
//! chain (read-only, no locks) and prints the seconds COUNT reads at random
//! 4 KiB-aligned offsets took (the same offsets for the same seed).

use std::time::Instant;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        eprintln!("usage: chain_reads IMAGE COUNT [SEED]");
        std::process::exit(2);
    }
    let count: u64 = args[2].parse().expect("COUNT is a number");
    let mut state: u64 = args.get(3).map_or(7, |s| s.parse().expect("SEED"));
    let spec = strata_chain::OpenSpec::new(&args[1]).force_share(true);
    let chain = strata_chain::open(&spec).unwrap_or_else(|e| {
        eprintln!("chain_reads: {e}");
        std::process::exit(1)
    });
    let top = chain.reader();
    let blocks = top.virtual_size() / 4096;
    let mut buf = vec![0u8; 4096];
    let mut sum = 0u64;
    let t0 = Instant::now();
    for _ in 0..count {
        // xorshift64*: cheap, deterministic offsets.
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        let r = state.wrapping_mul(0x2545_f491_4f6c_dd1d);
        let off = (r % blocks) * 4096;
        top.read(&mut buf, off).expect("read");
        sum = sum.wrapping_add(buf[0] as u64);
    }
    let secs = t0.elapsed().as_secs_f64();
    println!("{secs:.6} {} layers {sum}", chain.layers.len());
}
