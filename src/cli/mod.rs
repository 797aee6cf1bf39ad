//! Subcommand implementations.

pub mod bench;
pub mod bench_train;
pub mod eval;
pub mod generate;
pub mod merge;
pub mod self_instruct;
pub mod train;

use std::path::Path;
use std::sync::Arc;
use tuneshop::config::Settings;
use tuneshop::infer::{AdapterLease, ServedAdapter};
use tuneshop::model::BaseModel;
use tuneshop::startup::Application;

/// A PEFT adapter directory in the form the server serves it (so answers match the server's).
pub fn served_adapter(dir: &Path, model: &BaseModel) -> anyhow::Result<AdapterLease> {
    let a = tuneshop::lora::peft::load(dir, model.llama.config(), &candle_core::Device::Cpu)?;
    Ok(Arc::new(ServedAdapter::new(
        uuid::Uuid::nil(),
        &a,
        model.llama.device(),
    )?))
}

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
