//! Bounds of a GGUF file checked before candle reads it. candle's reader allocates whatever a
//! header claims (a string of 2^60 bytes, an array of 2^60 values, 2^32 dimensions), recurses
//! into nested arrays without limit, divides by `general.alignment` (zero panics) and reads
//! tensors wherever their offsets point. [`check_header`] walks the header first and caps every
//! length against the bytes left in the file; [`check_tensors`] checks each tensor's byte range
//! against the file's length once the header is read.

use std::io::Read;

use anyhow::{bail, Context, Result};
use candle_core::quantized::gguf_file::Content;

/// Nested arrays deeper than this are refused (GGUF files use one level).
const MAX_ARRAY_DEPTH: usize = 4;
/// Tensors of more dimensions are refused (ggml has at most 4).
const MAX_DIMS: u64 = 8;
const STRING: u32 = 8;
const ARRAY: u32 = 9;

/// A reader that counts the bytes it consumed and knows how many the file has.
struct Scan<R> {
    r: R,
    pos: u64,
    len: u64,
    /// GGUF v1: 32-bit counts and lengths.
    v1: bool,
}

impl<R: Read> Scan<R> {
    fn left(&self) -> u64 {
        self.len.saturating_sub(self.pos)
    }

    /// Fail unless `n` more bytes (`what`) fit in the file.
    fn fits(&self, n: Option<u64>, what: &str) -> Result<()> {
        match n {
            Some(n) if n <= self.left() => Ok(()),
            _ => bail!(
                "{what} at byte {} claims more bytes than the file has ({} left)",
                self.pos,
                self.left()
            ),
        }
    }

    fn take(&mut self, n: u64, what: &str) -> Result<Vec<u8>> {
        self.fits(Some(n), what)?;
        let mut buf = vec![0u8; n as usize];
        self.r.read_exact(&mut buf).context("truncated")?;
        self.pos += n;
        Ok(buf)
    }

    fn skip(&mut self, n: u64, what: &str) -> Result<()> {
        self.fits(Some(n), what)?;
        let got = std::io::copy(&mut (&mut self.r).take(n), &mut std::io::sink())?;
        if got != n {
            bail!("truncated {what} at byte {}", self.pos);
        }
        self.pos += n;
        Ok(())
    }

    fn u32(&mut self) -> Result<u32> {
        let b = self.take(4, "a 32-bit field")?;
        Ok(u32::from_le_bytes(b.try_into().unwrap_or_default()))
    }

    fn u64(&mut self) -> Result<u64> {
        let b = self.take(8, "a 64-bit field")?;
        Ok(u64::from_le_bytes(b.try_into().unwrap_or_default()))
    }

    /// A count or length: 32 bits in v1, 64 after.
    fn count(&mut self) -> Result<u64> {
        if self.v1 {
            Ok(self.u32()? as u64)
        } else {
            self.u64()
        }
    }

    fn string(&mut self, what: &str) -> Result<Vec<u8>> {
        let n = self.count()?;
        self.take(n, what)
    }

    /// Skip a value of type `ty`; an integer value is returned (for `general.alignment`).
    fn value(&mut self, ty: u32, depth: usize) -> Result<Option<u64>> {
        let prefix = if self.v1 { 4 } else { 8 };
        match ty {
            STRING => {
                let n = self.count()?;
                self.skip(n, "a string")?;
                Ok(None)
            }
            ARRAY => {
                if depth >= MAX_ARRAY_DEPTH {
                    bail!(
                        "arrays nested deeper than {MAX_ARRAY_DEPTH} at byte {}",
                        self.pos
                    );
                }
                let inner = self.u32()?;
                let n = self.count()?;
                let least = match inner {
                    STRING => prefix,
                    ARRAY => 4 + prefix,
                    t => scalar_size(t).with_context(|| format!("value type {t}"))?,
                };
                self.fits(n.checked_mul(least), "an array")?;
                if inner == STRING || inner == ARRAY {
                    for _ in 0..n {
                        self.value(inner, depth + 1)?;
                    }
                } else {
                    self.skip(n * least, "an array")?;
                }
                Ok(None)
            }
            t => {
                let size = scalar_size(t).with_context(|| format!("value type {t}"))?;
                let b = self.take(size, "a value")?;
                let mut wide = [0u8; 8];
                wide[..b.len()].copy_from_slice(&b);
                Ok(Some(u64::from_le_bytes(wide)))
            }
        }
    }
}

/// Bytes of a scalar GGUF value type, `None` for an unknown type.
fn scalar_size(ty: u32) -> Option<u64> {
    match ty {
        0 | 1 | 7 => Some(1),
        2 | 3 => Some(2),
        4..=6 => Some(4),
        10..=12 => Some(8),
        _ => None,
    }
}

/// Walk a GGUF header of a file of `len` bytes, failing on any length that exceeds the file,
/// nesting deeper than [`MAX_ARRAY_DEPTH`], more than [`MAX_DIMS`] dimensions or a zero
/// alignment; leaves `r` somewhere in the file (seek back before reading it again).
pub fn check_header(r: impl Read, len: u64) -> Result<()> {
    let mut s = Scan {
        r,
        pos: 0,
        len,
        v1: false,
    };
    let magic = s.u32()?;
    let version = s.u32()?;
    if magic != 0x4655_4747 || !(1..=3).contains(&version) {
        return Ok(()); // candle names the bad magic or version
    }
    s.v1 = version == 1;
    let tensors = s.count()?;
    let kvs = s.count()?;
    for _ in 0..kvs {
        let key = s.string("a metadata key")?;
        let ty = s.u32()?;
        let v = s.value(ty, 0)?;
        if key == b"general.alignment" && v == Some(0) && matches!(ty, 0..=5) {
            bail!("general.alignment is 0");
        }
    }
    for _ in 0..tensors {
        s.string("a tensor name")?;
        let dims = s.u32()? as u64;
        if dims > MAX_DIMS {
            bail!("a tensor of {dims} dimensions at byte {}", s.pos);
        }
        let width = if s.v1 { 4 } else { 8 };
        s.skip(dims * width, "tensor dimensions")?;
        s.skip(4 + 8, "a tensor's type and offset")?;
    }
    Ok(())
}

/// Fail unless every tensor has elements and its bytes lie inside a file of `len` bytes. An
/// empty tensor is refused too: candle would view its empty buffer (whose pointer is only
/// byte-aligned) as a slice of blocks, which is undefined behaviour.
pub fn check_tensors(c: &Content, len: u64) -> Result<()> {
    for (name, t) in &c.tensor_infos {
        let elems = t
            .shape
            .dims()
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d));
        if elems == Some(0) {
            bail!("tensor {name} {:?} has no elements", t.shape.dims());
        }
        let block = t.ggml_dtype.block_size();
        let end = elems
            .filter(|e| e.is_multiple_of(block))
            .and_then(|e| (e / block).checked_mul(t.ggml_dtype.type_size()))
            .and_then(|size| {
                c.tensor_data_offset
                    .checked_add(t.offset)?
                    .checked_add(size as u64)
            });
        match end {
            Some(end) if end <= len => {}
            _ => bail!(
                "tensor {name} ({:?}, {:?} at offset {}) does not fit in the file ({len} bytes)",
                t.shape.dims(),
                t.ggml_dtype,
                t.offset
            ),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A GGUF v3 header with `tensors` tensors and the metadata `kvs` (already encoded, `n` of
    /// them), padded so that the file is long enough for the honest parts.
    fn gguf(tensors: u64, n: u64, kvs: &[u8]) -> Vec<u8> {
        let mut b = b"GGUF".to_vec();
        b.extend(3u32.to_le_bytes());
        b.extend(tensors.to_le_bytes());
        b.extend(n.to_le_bytes());
        b.extend(kvs);
        b.extend([0u8; 64]);
        b
    }

    fn key(name: &str, ty: u32) -> Vec<u8> {
        let mut b = (name.len() as u64).to_le_bytes().to_vec();
        b.extend(name.as_bytes());
        b.extend(ty.to_le_bytes());
        b
    }

    fn check(b: &[u8]) -> String {
        match check_header(b, b.len() as u64) {
            Ok(()) => "ok".into(),
            Err(e) => format!("{e:#}"),
        }
    }

    #[test]
    fn absurd_lengths_are_refused_before_allocating() {
        // A key of 2^63 bytes.
        let mut kv = (1u64 << 63).to_le_bytes().to_vec();
        kv.extend(b"x");
        assert!(check(&gguf(0, 1, &kv)).contains("claims more bytes"));
        // An array of 2^60 u32.
        let mut kv = key("a", ARRAY);
        kv.extend(4u32.to_le_bytes());
        kv.extend((1u64 << 60).to_le_bytes());
        assert!(check(&gguf(0, 1, &kv)).contains("an array"));
        // A string value of u64::MAX bytes.
        let mut kv = key("s", STRING);
        kv.extend(u64::MAX.to_le_bytes());
        assert!(check(&gguf(0, 1, &kv)).contains("claims more bytes"));
        // Arrays nested past the limit, each of one element.
        let mut kv = key("n", ARRAY);
        for _ in 0..MAX_ARRAY_DEPTH + 1 {
            kv.extend(ARRAY.to_le_bytes());
            kv.extend(1u64.to_le_bytes());
        }
        assert!(check(&gguf(0, 1, &kv)).contains("nested"));
        // A zero alignment (candle divides by it).
        let mut kv = key("general.alignment", 4);
        kv.extend(0u32.to_le_bytes());
        assert!(check(&gguf(0, 1, &kv)).contains("alignment is 0"));
        // A tensor of 2^32 - 1 dimensions.
        let mut t = 1u64.to_le_bytes().to_vec();
        t.extend(b"t");
        t.extend(u32::MAX.to_le_bytes());
        assert!(check(&gguf(1, 0, &t)).contains("dimensions"));
        // Honest small metadata passes.
        let mut kv = key("general.alignment", 4);
        kv.extend(32u32.to_le_bytes());
        assert_eq!(check(&gguf(0, 1, &kv)), "ok");
    }
}
