//! tuneshop: a self-hosted LoRA fine-tuning-as-a-service server for LLaMA-family models.

pub mod api;
pub mod bench;
pub mod config;
pub mod db;
pub mod error;
pub mod infer;
pub mod lora;
pub mod metrics;
pub mod model;
pub mod queue;
pub mod selfinstruct;
pub mod startup;
pub mod store;
pub mod telemetry;
pub mod train;
