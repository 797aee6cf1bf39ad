//! Subcommand implementations.

pub mod bench;
pub mod bench_train;
pub mod eval;
pub mod generate;
pub mod merge;
pub mod self_instruct;
pub mod train;

use tuneshop::config::Settings;
use tuneshop::startup::Application;

pub fn serve(settings: Settings) -> anyhow::Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let app = Application::build(settings).await?;
        app.run_until_stopped().await?;
        Ok(())
    })
}

pub fn print_openapi() -> anyhow::Result<()> {
    let spec = tuneshop::api::openapi_spec();
    println!("{}", serde_json::to_string_pretty(&spec)?);
    Ok(())
}
