use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let settings = command_api::Settings::parse();
    let _telemetry = platform::telemetry::init("command-api");
    command_api::Application::build(settings).await?.run_until_stopped().await
}
