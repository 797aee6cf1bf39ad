//! The GGUF container: reads metadata and tensor descriptors, and writes files.
//!
//! Reading is defensive: every length is bounded and every tensor must lie inside the file, so a
//! corrupt or truncated file is a [`GgufError`], never a panic or a giant allocation. This module
//! knows nothing about LLaMA; `config.rs` and `loader.rs` interpret the keys and tensors.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

mod writer;

pub use writer::GgufWriter;

const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;
/// Bounds that no real model file reaches; past them the file is corrupt.
const MAX_STRING_BYTES: u64 = 64 << 20;
const MAX_ARRAY_LEN: u64 = 1 << 24;
const MAX_TENSORS: u64 = 1 << 20;
const MAX_KEYS: u64 = 1 << 16;

#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("cannot read `{path}`: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("`{0}` is not a GGUF file (bad magic bytes)")]
    NotGguf(PathBuf),
    #[error("`{path}` has GGUF version {version}; versions 2 and 3 are supported")]
    UnsupportedVersion { path: PathBuf, version: u32 },
    #[error("`{path}` is corrupt: {detail}")]
    Corrupt { path: PathBuf, detail: String },
    #[error("`{path}` is truncated: tensor `{tensor}` ends at byte {needed} but the file has {len} bytes")]
    Truncated {
        path: PathBuf,
        tensor: String,
        needed: u64,
        len: u64,
    },
    #[error(
        "`{path}`: metadata key `{key}` is missing or has the wrong type (expected {expected})"
    )]
    Metadata {
        path: PathBuf,
        key: String,
        expected: &'static str,
    },
    #[error("`{path}`: tensor `{name}` is missing")]
    MissingTensor { path: PathBuf, name: String },
}

/// ggml tensor element types that appear in GGUF files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgmlType {
    F32,
    F16,
    BF16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q8_1,
    Q2K,
    Q3K,
    Q4K,
    Q5K,
    Q6K,
    Q8K,
}

impl GgmlType {
    pub fn from_id(id: u32) -> Option<Self> {
        Some(match id {
            0 => Self::F32,
            1 => Self::F16,
            2 => Self::Q4_0,
            3 => Self::Q4_1,
            6 => Self::Q5_0,
            7 => Self::Q5_1,
            8 => Self::Q8_0,
            9 => Self::Q8_1,
            10 => Self::Q2K,
            11 => Self::Q3K,
            12 => Self::Q4K,
            13 => Self::Q5K,
            14 => Self::Q6K,
            15 => Self::Q8K,
            30 => Self::BF16,
            _ => return None,
        })
    }

    pub fn id(self) -> u32 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::Q4_0 => 2,
            Self::Q4_1 => 3,
            Self::Q5_0 => 6,
            Self::Q5_1 => 7,
            Self::Q8_0 => 8,
            Self::Q8_1 => 9,
            Self::Q2K => 10,
            Self::Q3K => 11,
            Self::Q4K => 12,
            Self::Q5K => 13,
            Self::Q6K => 14,
            Self::Q8K => 15,
            Self::BF16 => 30,
        }
    }

    /// (elements per block, bytes per block)
    pub fn block_layout(self) -> (u64, u64) {
        match self {
            Self::F32 => (1, 4),
            Self::F16 | Self::BF16 => (1, 2),
            Self::Q4_0 => (32, 18),
            Self::Q4_1 => (32, 20),
            Self::Q5_0 => (32, 22),
            Self::Q5_1 => (32, 24),
            Self::Q8_0 => (32, 34),
            Self::Q8_1 => (32, 36),
            Self::Q2K => (256, 84),
            Self::Q3K => (256, 110),
            Self::Q4K => (256, 144),
            Self::Q5K => (256, 176),
            Self::Q6K => (256, 210),
            Self::Q8K => (256, 292),
        }
    }
}

/// A metadata value. Integers of every width are kept as they were written.
#[derive(Debug, Clone, PartialEq)]
pub enum MetaValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(Vec<MetaValue>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl MetaValue {
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Self::U8(v) => Some(v.into()),
            Self::U16(v) => Some(v.into()),
            Self::U32(v) => Some(v.into()),
            Self::U64(v) => Some(v),
            Self::I8(v) => u64::try_from(v).ok(),
            Self::I16(v) => u64::try_from(v).ok(),
            Self::I32(v) => u64::try_from(v).ok(),
            Self::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Self::F32(v) => Some(v.into()),
            Self::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Self::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Self::Bool(b) => Some(b),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[MetaValue]> {
        match self {
            Self::Array(items) => Some(items),
            _ => None,
        }
    }

    pub(crate) fn type_id(&self) -> u32 {
        match self {
            Self::U8(_) => 0,
            Self::I8(_) => 1,
            Self::U16(_) => 2,
            Self::I16(_) => 3,
            Self::U32(_) => 4,
            Self::I32(_) => 5,
            Self::F32(_) => 6,
            Self::Bool(_) => 7,
            Self::String(_) => 8,
            Self::Array(_) => 9,
            Self::U64(_) => 10,
            Self::I64(_) => 11,
            Self::F64(_) => 12,
        }
    }
}

/// Where one tensor lives in the file.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub name: String,
    /// ggml order: `dims[0]` is the innermost (row length).
    pub dims: Vec<usize>,
    pub ggml_type: GgmlType,
    /// Absolute byte offset in the file.
    pub offset: u64,
    pub n_bytes: u64,
}

impl TensorInfo {
    pub fn n_elements(&self) -> usize {
        self.dims.iter().product()
    }
}

/// A parsed GGUF header; tensor bytes are read on demand.
#[derive(Debug)]
pub struct GgufFile {
    pub path: PathBuf,
    pub version: u32,
    pub metadata: HashMap<String, MetaValue>,
    pub tensors: Vec<TensorInfo>,
    by_name: HashMap<String, usize>,
}

struct HeaderReader<R> {
    inner: R,
    path: PathBuf,
    version: u32,
}

impl<R: Read> HeaderReader<R> {
    fn io(&self, source: std::io::Error) -> GgufError {
        if source.kind() == std::io::ErrorKind::UnexpectedEof {
            return self.corrupt("the header ends before all metadata was read".into());
        }
        GgufError::Io {
            path: self.path.clone(),
            source,
        }
    }

    fn corrupt(&self, detail: String) -> GgufError {
        GgufError::Corrupt {
            path: self.path.clone(),
            detail,
        }
    }

    fn bytes<const N: usize>(&mut self) -> Result<[u8; N], GgufError> {
        let mut buf = [0u8; N];
        self.inner.read_exact(&mut buf).map_err(|e| self.io(e))?;
        Ok(buf)
    }

    fn u32(&mut self) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.bytes()?))
    }

    fn u64(&mut self) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.bytes()?))
    }

    /// Version 1 used 32-bit counts; it is rejected before any count is read.
    fn count(&mut self, what: &str, max: u64) -> Result<u64, GgufError> {
        let n = self.u64()?;
        if n > max {
            return Err(self.corrupt(format!("{what} {n} exceeds the limit {max}")));
        }
        Ok(n)
    }

    fn string(&mut self) -> Result<String, GgufError> {
        let len = self.count("string length", MAX_STRING_BYTES)?;
        let mut buf = vec![0u8; len as usize];
        self.inner.read_exact(&mut buf).map_err(|e| self.io(e))?;
        String::from_utf8(buf).map_err(|_| self.corrupt("a string is not valid UTF-8".into()))
    }

    fn value(&mut self, type_id: u32, depth: u32) -> Result<MetaValue, GgufError> {
        Ok(match type_id {
            0 => MetaValue::U8(self.bytes::<1>()?[0]),
            1 => MetaValue::I8(self.bytes::<1>()?[0] as i8),
            2 => MetaValue::U16(u16::from_le_bytes(self.bytes()?)),
            3 => MetaValue::I16(i16::from_le_bytes(self.bytes()?)),
            4 => MetaValue::U32(self.u32()?),
            5 => MetaValue::I32(i32::from_le_bytes(self.bytes()?)),
            6 => MetaValue::F32(f32::from_le_bytes(self.bytes()?)),
            7 => MetaValue::Bool(self.bytes::<1>()?[0] != 0),
            8 => MetaValue::String(self.string()?),
            9 => {
                if depth > 2 {
                    return Err(self.corrupt("arrays nested too deeply".into()));
                }
                let item_type = self.u32()?;
                let len = self.count("array length", MAX_ARRAY_LEN)?;
                let mut items = Vec::with_capacity(len.min(1 << 16) as usize);
                for _ in 0..len {
                    items.push(self.value(item_type, depth + 1)?);
                }
                MetaValue::Array(items)
            }
            10 => MetaValue::U64(self.u64()?),
            11 => MetaValue::I64(i64::from_le_bytes(self.bytes()?)),
            12 => MetaValue::F64(f64::from_le_bytes(self.bytes()?)),
            other => return Err(self.corrupt(format!("unknown metadata value type {other}"))),
        })
    }
}

impl GgufFile {
    /// Parses the header of `path` and checks that every tensor lies inside the file.
    pub fn open(path: &Path) -> Result<Self, GgufError> {
        let io = |source| GgufError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = File::open(path).map_err(io)?;
        let file_len = file.metadata().map_err(io)?.len();
        let mut r = HeaderReader {
            inner: BufReader::new(file),
            path: path.to_path_buf(),
            version: 0,
        };
        let magic: [u8; 4] = r
            .bytes()
            .map_err(|_| GgufError::NotGguf(path.to_path_buf()))?;
        if &magic != MAGIC {
            return Err(GgufError::NotGguf(path.to_path_buf()));
        }
        r.version = r.u32()?;
        if !(2..=3).contains(&r.version) {
            return Err(GgufError::UnsupportedVersion {
                path: path.to_path_buf(),
                version: r.version,
            });
        }
        let n_tensors = r.count("tensor count", MAX_TENSORS)?;
        let n_keys = r.count("metadata key count", MAX_KEYS)?;
        let mut metadata = HashMap::new();
        for _ in 0..n_keys {
            let key = r.string()?;
            let type_id = r.u32()?;
            let value = r.value(type_id, 0)?;
            metadata.insert(key, value);
        }
        let mut raw = Vec::with_capacity(n_tensors as usize);
        for _ in 0..n_tensors {
            let name = r.string()?;
            let n_dims = r.u32()?;
            if n_dims == 0 || n_dims > 4 {
                return Err(r.corrupt(format!("tensor `{name}` has {n_dims} dimensions")));
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                let d = r.u64()?;
                if d == 0 || d > 1 << 32 {
                    return Err(r.corrupt(format!("tensor `{name}` has a dimension of {d}")));
                }
                dims.push(d);
            }
            let type_id = r.u32()?;
            let ggml_type = GgmlType::from_id(type_id).ok_or_else(|| {
                r.corrupt(format!("tensor `{name}` has unknown ggml type {type_id}"))
            })?;
            let offset = r.u64()?;
            raw.push((name, dims, ggml_type, offset));
        }
        let header_end = r.inner.stream_position().map_err(io)?;
        let alignment = match metadata.get("general.alignment") {
            Some(v) => v
                .as_u64()
                .filter(|a| a.is_power_of_two())
                .ok_or_else(|| r.corrupt("`general.alignment` is not a power of two".into()))?,
            None => DEFAULT_ALIGNMENT,
        };
        let data_start = header_end.div_ceil(alignment) * alignment;
        let mut tensors = Vec::with_capacity(raw.len());
        let mut by_name = HashMap::new();
        for (name, dims, ggml_type, rel_offset) in raw {
            let n_elements = dims.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d));
            let (block, block_bytes) = ggml_type.block_layout();
            let n_elements = n_elements
                .filter(|n| n % block == 0 && dims[0] % block == 0)
                .ok_or_else(|| {
                    r.corrupt(format!(
                        "tensor `{name}` shape {dims:?} does not fit {ggml_type:?} blocks"
                    ))
                })?;
            let n_bytes = n_elements / block * block_bytes;
            let offset = data_start
                .checked_add(rel_offset)
                .ok_or_else(|| r.corrupt(format!("tensor `{name}` has offset {rel_offset}")))?;
            let end = offset.saturating_add(n_bytes);
            if end > file_len {
                return Err(GgufError::Truncated {
                    path: path.to_path_buf(),
                    tensor: name,
                    needed: end,
                    len: file_len,
                });
            }
            by_name.insert(name.clone(), tensors.len());
            tensors.push(TensorInfo {
                name,
                dims: dims.into_iter().map(|d| d as usize).collect(),
                ggml_type,
                offset,
                n_bytes,
            });
        }
        Ok(Self {
            path: path.to_path_buf(),
            version: r.version,
            metadata,
            tensors,
            by_name,
        })
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.by_name.get(name).map(|&i| &self.tensors[i])
    }

    pub fn require_tensor(&self, name: &str) -> Result<&TensorInfo, GgufError> {
        self.tensor(name).ok_or_else(|| GgufError::MissingTensor {
            path: self.path.clone(),
            name: name.to_string(),
        })
    }

    pub fn get(&self, key: &str) -> Option<&MetaValue> {
        self.metadata.get(key)
    }

    fn meta_err(&self, key: &str, expected: &'static str) -> GgufError {
        GgufError::Metadata {
            path: self.path.clone(),
            key: key.to_string(),
            expected,
        }
    }

    pub fn get_str(&self, key: &str) -> Result<&str, GgufError> {
        self.get(key)
            .and_then(MetaValue::as_str)
            .ok_or_else(|| self.meta_err(key, "a string"))
    }

    pub fn get_u64(&self, key: &str) -> Result<u64, GgufError> {
        self.get(key)
            .and_then(MetaValue::as_u64)
            .ok_or_else(|| self.meta_err(key, "an unsigned integer"))
    }

    /// `Ok(None)` when absent, an error when present with the wrong type.
    pub fn opt_u64(&self, key: &str) -> Result<Option<u64>, GgufError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .map(Some)
                .ok_or_else(|| self.meta_err(key, "an unsigned integer")),
        }
    }

    pub fn opt_f64(&self, key: &str) -> Result<Option<f64>, GgufError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| self.meta_err(key, "a number")),
        }
    }

    pub fn string_array(&self, key: &str) -> Result<Vec<String>, GgufError> {
        let items = self
            .get(key)
            .and_then(MetaValue::as_array)
            .ok_or_else(|| self.meta_err(key, "an array of strings"))?;
        items
            .iter()
            .map(|v| v.as_str().map(str::to_string))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| self.meta_err(key, "an array of strings"))
    }

    /// Reads the raw bytes of one tensor.
    pub fn read_bytes(&self, info: &TensorInfo) -> Result<Vec<u8>, GgufError> {
        let io = |source| GgufError::Io {
            path: self.path.clone(),
            source,
        };
        let mut file = File::open(&self.path).map_err(io)?;
        file.seek(SeekFrom::Start(info.offset)).map_err(io)?;
        let mut buf = vec![0u8; info.n_bytes as usize];
        file.read_exact(&mut buf).map_err(io)?;
        Ok(buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(path: &Path) {
        let mut w = GgufWriter::new();
        w.meta("general.architecture", MetaValue::String("llama".into()))
            .meta("llama.block_count", MetaValue::U32(2))
            .meta(
                "tokenizer.ggml.tokens",
                MetaValue::Array(vec![
                    MetaValue::String("a".into()),
                    MetaValue::String("b".into()),
                ]),
            );
        w.tensor("t0", vec![4], GgmlType::F32, vec![1u8; 16]);
        w.tensor("t1", vec![32, 2], GgmlType::Q8_0, vec![2u8; 68]);
        w.write(path).unwrap();
    }

    #[test]
    fn round_trips_metadata_and_tensors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.gguf");
        sample(&path);
        let f = GgufFile::open(&path).unwrap();
        assert_eq!(f.get_str("general.architecture").unwrap(), "llama");
        assert_eq!(f.get_u64("llama.block_count").unwrap(), 2);
        assert_eq!(
            f.string_array("tokenizer.ggml.tokens").unwrap(),
            vec!["a", "b"]
        );
        let t1 = f.require_tensor("t1").unwrap();
        assert_eq!(t1.dims, vec![32, 2]);
        assert_eq!(f.read_bytes(t1).unwrap(), vec![2u8; 68]);
        assert_eq!(
            f.read_bytes(f.require_tensor("t0").unwrap()).unwrap(),
            vec![1u8; 16]
        );
    }

    #[test]
    fn truncated_and_garbage_files_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.gguf");
        sample(&path);
        let bytes = std::fs::read(&path).unwrap();
        let cut = dir.path().join("cut.gguf");
        std::fs::write(&cut, &bytes[..bytes.len() - 10]).unwrap();
        assert!(matches!(
            GgufFile::open(&cut),
            Err(GgufError::Truncated { .. })
        ));
        // Cut inside the header.
        std::fs::write(&cut, &bytes[..40]).unwrap();
        assert!(matches!(
            GgufFile::open(&cut),
            Err(GgufError::Corrupt { .. })
        ));
        std::fs::write(&cut, b"not a model at all").unwrap();
        assert!(matches!(GgufFile::open(&cut), Err(GgufError::NotGguf(_))));
        // A huge bogus string length must not allocate.
        let mut evil = bytes[..24].to_vec();
        evil.extend_from_slice(&u64::MAX.to_le_bytes());
        std::fs::write(&cut, &evil).unwrap();
        assert!(matches!(
            GgufFile::open(&cut),
            Err(GgufError::Corrupt { .. })
        ));
    }
}
