//! The `relay` binary; see [`relay::cli`] for the commands.

/// mimalloc rather than glibc's malloc: an HTTP publish allocates and frees dozens of small
/// blocks (headers, JSON, metrics labels), and glibc spent 15 % of relay's CPU on them
/// (docs/performance.md). Tests and benchmarks keep the system allocator.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    relay::cli::main()
}
