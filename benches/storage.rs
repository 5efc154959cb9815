//! storage benchmark: run with `cargo bench --bench storage` against the testbed.

fn main() {
    eprintln!("the storage benchmark is not written yet");
    std::process::exit(2);
}
