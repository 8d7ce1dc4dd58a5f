//! The `relay` binary; see [`relay::cli`] for the commands.

fn main() -> std::process::ExitCode {
    relay::cli::main()
}
