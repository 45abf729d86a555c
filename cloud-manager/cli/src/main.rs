//! `ferry`: the operator CLI; parses arguments and prints what the control API answers.
use clap::Parser;
use std::process::ExitCode;

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args = ferry_cli::commands::Args::parse();
    ferry_common::version::set_component("ferry");
    match ferry_cli::commands::run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ferry: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}
