//! Writes GGUF files (the generated test model; exports).

use super::{GgmlType, MetaValue, DEFAULT_ALIGNMENT, MAGIC};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

/// Builds a GGUF file in memory order and writes it in one go.
#[derive(Default)]
pub struct GgufWriter {
    metadata: Vec<(String, MetaValue)>,
    tensors: Vec<(String, Vec<usize>, GgmlType, Vec<u8>)>,
}

impl GgufWriter {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn meta(&mut self, key: &str, value: MetaValue) -> &mut Self {
        self.metadata.push((key.to_string(), value));
        self
    }

    /// `dims` in ggml order (innermost first); `bytes` already encoded in `ggml_type`.
    pub fn tensor(&mut self, name: &str, dims: Vec<usize>, ggml_type: GgmlType, bytes: Vec<u8>) {
        self.tensors
            .push((name.to_string(), dims, ggml_type, bytes));
    }

    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        let mut w = BufWriter::new(File::create(path)?);
        w.write_all(MAGIC)?;
        w.write_all(&3u32.to_le_bytes())?;
        w.write_all(&(self.tensors.len() as u64).to_le_bytes())?;
        w.write_all(&(self.metadata.len() as u64).to_le_bytes())?;
        let mut pos = 24u64;
        for (key, value) in &self.metadata {
            pos += write_string(&mut w, key)?;
            w.write_all(&value.type_id().to_le_bytes())?;
            pos += 4 + write_value(&mut w, value)?;
        }
        let mut rel = 0u64;
        let mut offsets = Vec::with_capacity(self.tensors.len());
        for (name, dims, ggml_type, bytes) in &self.tensors {
            pos += write_string(&mut w, name)?;
            w.write_all(&(dims.len() as u32).to_le_bytes())?;
            for &d in dims {
                w.write_all(&(d as u64).to_le_bytes())?;
            }
            w.write_all(&ggml_type.id().to_le_bytes())?;
            w.write_all(&rel.to_le_bytes())?;
            pos += 4 + 8 * dims.len() as u64 + 4 + 8;
            offsets.push(rel);
            rel = (rel + bytes.len() as u64).div_ceil(DEFAULT_ALIGNMENT) * DEFAULT_ALIGNMENT;
        }
        let data_start = pos.div_ceil(DEFAULT_ALIGNMENT) * DEFAULT_ALIGNMENT;
        w.write_all(&vec![0u8; (data_start - pos) as usize])?;
        let mut written = 0u64;
        for ((_, _, _, bytes), off) in self.tensors.iter().zip(offsets) {
            w.write_all(&vec![0u8; (off - written) as usize])?;
            w.write_all(bytes)?;
            written = off + bytes.len() as u64;
        }
        w.flush()
    }
}

fn write_string(w: &mut impl Write, s: &str) -> std::io::Result<u64> {
    w.write_all(&(s.len() as u64).to_le_bytes())?;
    w.write_all(s.as_bytes())?;
    Ok(8 + s.len() as u64)
}

fn write_value(w: &mut impl Write, v: &MetaValue) -> std::io::Result<u64> {
    let scalar = |w: &mut dyn Write, b: &[u8]| w.write_all(b).map(|_| b.len() as u64);
    match v {
        MetaValue::U8(x) => scalar(w, &x.to_le_bytes()),
        MetaValue::I8(x) => scalar(w, &x.to_le_bytes()),
        MetaValue::U16(x) => scalar(w, &x.to_le_bytes()),
        MetaValue::I16(x) => scalar(w, &x.to_le_bytes()),
        MetaValue::U32(x) => scalar(w, &x.to_le_bytes()),
        MetaValue::I32(x) => scalar(w, &x.to_le_bytes()),
        MetaValue::F32(x) => scalar(w, &x.to_le_bytes()),
        MetaValue::Bool(x) => scalar(w, &[*x as u8]),
        MetaValue::U64(x) => scalar(w, &x.to_le_bytes()),
        MetaValue::I64(x) => scalar(w, &x.to_le_bytes()),
        MetaValue::F64(x) => scalar(w, &x.to_le_bytes()),
        MetaValue::String(s) => write_string(w, s),
        MetaValue::Array(items) => {
            let item_type = items.first().map_or(4, MetaValue::type_id);
            w.write_all(&item_type.to_le_bytes())?;
            w.write_all(&(items.len() as u64).to_le_bytes())?;
            let mut n = 12;
            for item in items {
                n += write_value(w, item)?;
            }
            Ok(n)
        }
    }
}
