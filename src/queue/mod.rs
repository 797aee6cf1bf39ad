//! Work that runs on the device: the device thread that owns the model. (The job queue and the
//! job runner arrive with the service API.)

pub mod device;
