//! `ferry-tunnel`: not built yet; it says so and exits non-zero rather than pretending.
use clap::Parser;

#[derive(Parser)]
#[command(
    name = "ferry-tunnel",
    version,
    about = "Ferry tunnels (not yet available)"
)]
struct Args {
    /// Role: enterprise, gateway, app or check.
    role: String,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    eprintln!(
        "ferry-tunnel: role {:?} is not available in this build",
        args.role
    );
    std::process::ExitCode::from(2)
}
