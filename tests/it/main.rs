//! Integration tests: one binary, one module per area. Unit tests live beside the code.

mod api;
mod api_errors;
mod api_infer;
mod api_jobs;
mod api_process;
mod batching;
mod candle_reference;
mod cli;
mod cli_train;
mod deploy;
mod generation;
mod helpers;
mod model_tiny;
mod openai_client;
mod peft_compat;
mod real_model;
mod real_serving;
mod scale_out;
mod self_instruct;
mod server;
mod store_contract;
mod tokenizer;
mod train_tiny;
