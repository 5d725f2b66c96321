use clap::Parser;
use projector::{Application, Cli, Command};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command.unwrap_or(Command::Run) {
        Command::Run => {
            platform::telemetry::init("projector");
            Application::build(cli.settings).await?.run_until_stopped().await
        }
        Command::Status => projector::print_status(cli.settings).await,
    }
}
