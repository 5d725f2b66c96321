use clap::Parser;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let settings = query_api::Settings::parse();
    let _telemetry = platform::telemetry::init("query-api");
    query_api::Application::build(settings).await?.run_until_stopped().await
}
