use clap::Parser;
use projector::{Application, Cli, Command};

/// mimalloc, as in the command API and the query API: many small short-lived allocations per record.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command.unwrap_or(Command::Run) {
        Command::Run => {
            let _telemetry = platform::telemetry::init("projector");
            match Application::build(cli.settings).await {
                Ok(app) => app.run_until_stopped().await,
                Err(e) => Err(e),
            }
        }
        command => {
            // Command-line tools: warnings and errors only, readable, on stderr.
            let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into());
            let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).compact().try_init();
            match command {
                Command::Status => projector::print_status(cli.settings).await,
                Command::Rebuild { projections, yes } => projector::rebuild_cli(cli.settings, projections, yes).await,
                Command::Dlq { command } => projector::dlq_cli(cli.settings, command).await,
                Command::EraseUser { user } => projector::erase_user_cli(cli.settings, user).await,
                Command::RewrapKeys => projector::rewrap_keys_cli(cli.settings).await,
                Command::Run => unreachable!("handled above"),
            }
        }
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            if matches!(e.downcast_ref::<projector::rebuild::RebuildError>(), Some(projector::rebuild::RebuildError::Aborted)) {
                std::process::ExitCode::from(130)
            } else {
                std::process::ExitCode::FAILURE
            }
        }
    }
}
