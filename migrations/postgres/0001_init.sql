-- tuneshop schema (PostgreSQL). Ids are UUID text, times are unix milliseconds. Every dataset, job and
-- adapter belongs to a tenant; the jobs table is the queue (claimed in `seq` order).
CREATE TABLE tenants (
    id TEXT PRIMARY KEY NOT NULL,
    name TEXT NOT NULL,
    created_at BIGINT NOT NULL
);

CREATE TABLE api_keys (
    id TEXT PRIMARY KEY NOT NULL,
    tenant_id TEXT NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
    key_hash TEXT NOT NULL UNIQUE,
    prefix TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    revoked_at BIGINT
);
CREATE INDEX api_keys_tenant ON api_keys(tenant_id);

-- One-time actions (the first tenant), claimed by inserting their key.
CREATE TABLE bootstrap (
    key TEXT PRIMARY KEY NOT NULL,
    created_at BIGINT NOT NULL
);

CREATE TABLE datasets (
    id TEXT PRIMARY KEY NOT NULL,
    tenant_id TEXT NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
    filename TEXT NOT NULL,
    format TEXT NOT NULL,
    row_count BIGINT NOT NULL,
    bytes BIGINT NOT NULL,
    sha256 TEXT NOT NULL,
    store_key TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE INDEX datasets_tenant ON datasets(tenant_id, created_at);

CREATE TABLE jobs (
    seq BIGSERIAL PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    tenant_id TEXT NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
    kind TEXT NOT NULL,
    status TEXT NOT NULL,
    base_model TEXT NOT NULL,
    training_dataset_id TEXT NOT NULL,
    validation_dataset_id TEXT,
    suffix TEXT,
    seed BIGINT NOT NULL,
    hyperparameters TEXT NOT NULL,
    total_steps BIGINT,
    step BIGINT NOT NULL DEFAULT 0,
    epoch DOUBLE PRECISION,
    train_loss DOUBLE PRECISION,
    valid_loss DOUBLE PRECISION,
    valid_token_accuracy DOUBLE PRECISION,
    learning_rate DOUBLE PRECISION,
    tokens_per_second DOUBLE PRECISION,
    eta_seconds DOUBLE PRECISION,
    trained_tokens BIGINT NOT NULL DEFAULT 0,
    adapter_id TEXT,
    error_code TEXT,
    error_message TEXT,
    cancel_requested BIGINT NOT NULL DEFAULT 0,
    attempts BIGINT NOT NULL DEFAULT 0,
    locked_by TEXT,
    heartbeat_at BIGINT,
    created_at BIGINT NOT NULL,
    started_at BIGINT,
    finished_at BIGINT,
    updated_at BIGINT NOT NULL
);
CREATE INDEX jobs_status ON jobs(status, seq);
CREATE INDEX jobs_tenant ON jobs(tenant_id, seq);

CREATE TABLE job_events (
    seq BIGSERIAL PRIMARY KEY,
    job_id TEXT NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
    created_at BIGINT NOT NULL,
    level TEXT NOT NULL,
    event_type TEXT NOT NULL,
    message TEXT NOT NULL,
    data TEXT
);
CREATE INDEX job_events_job ON job_events(job_id, seq);

CREATE TABLE checkpoints (
    id TEXT PRIMARY KEY NOT NULL,
    job_id TEXT NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
    step BIGINT NOT NULL,
    train_loss DOUBLE PRECISION,
    valid_loss DOUBLE PRECISION,
    store_key TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    UNIQUE (job_id, step)
);

CREATE TABLE adapters (
    id TEXT PRIMARY KEY NOT NULL,
    tenant_id TEXT NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
    name TEXT,
    source TEXT NOT NULL,
    job_id TEXT,
    base_model TEXT NOT NULL,
    lora_r BIGINT NOT NULL,
    lora_alpha DOUBLE PRECISION NOT NULL,
    target_modules TEXT NOT NULL,
    use_rslora BIGINT NOT NULL,
    parameters BIGINT NOT NULL,
    bytes BIGINT NOT NULL,
    store_key TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    UNIQUE (tenant_id, name)
);
CREATE INDEX adapters_tenant ON adapters(tenant_id, created_at);
