use clap::Parser;

/// mimalloc: the command API allocates many small short-lived objects per request/record; glibc malloc
/// (with its consolidation of freed chunks) was about a fifth of its CPU under load.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let settings = command_api::Settings::parse();
    let _telemetry = platform::telemetry::init("command-api");
    command_api::Application::build(settings).await?.run_until_stopped().await
}
