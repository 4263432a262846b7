//! The TCPStore wire format: request decoding and response encoding.
//!
//! Requests carry no length header, so a frame is decoded by walking its
//! fields. Decoding never copies: a [`Request`] borrows its keys and values from
//! the read buffer, and key lists stay encoded until they are iterated. When the
//! buffer holds only part of a frame, [`decode`] answers `Ok(None)` and the
//! caller reads more; a frame that can never be valid is a [`ProtocolError`] and
//! the connection is closed.
//!
//! All integers are little-endian (torch copies host-order integers and every
//! supported platform is little-endian).

use thiserror::Error;

/// The magic number a client sends with VALIDATE.
pub const VALIDATE_MAGIC: u32 = 0x3C85_F7CE;

/// Reply to WAIT and BARRIER once they are satisfied.
pub const STOP_WAITING: u8 = 0;
/// Reply to CANCEL_WAIT.
pub const WAIT_CANCELED: u8 = 1;
/// CHECK reply when every key exists.
pub const READY: u8 = 0;
/// CHECK reply when a key is missing.
pub const NOT_READY: u8 = 1;

/// Command codes (torch's `QueryType`), append-only across torch versions.
pub mod code {
    pub const VALIDATE: u8 = 0;
    pub const SET: u8 = 1;
    pub const COMPARE_SET: u8 = 2;
    pub const GET: u8 = 3;
    pub const ADD: u8 = 4;
    pub const CHECK: u8 = 5;
    pub const WAIT: u8 = 6;
    pub const GETNUMKEYS: u8 = 7;
    pub const DELETE_KEY: u8 = 8;
    pub const APPEND: u8 = 9;
    pub const MULTI_GET: u8 = 10;
    pub const MULTI_SET: u8 = 11;
    pub const CANCEL_WAIT: u8 = 12;
    pub const PING: u8 = 13;
    pub const QUEUE_PUSH: u8 = 14;
    pub const QUEUE_POP: u8 = 15;
    pub const QUEUE_LEN: u8 = 16;
    pub const LIST_KEYS: u8 = 17;
    pub const BARRIER: u8 = 18;
}

/// Size limits the server enforces on every frame. A frame beyond them closes
/// the offending connection and nothing else.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Longest key in bytes (torch's libuv server: 8 KiB).
    pub max_key_len: u64,
    /// Longest value in bytes (torch's libuv server: 8 MiB).
    pub max_value_len: u64,
    /// Most keys in one CHECK, WAIT, MULTI_GET or MULTI_SET (torch: 131,072).
    pub max_keys: u64,
    /// Largest whole frame in bytes; bounds what one connection can make the
    /// server buffer.
    pub max_frame_len: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_key_len: 64 * 1024,
            max_value_len: 64 * 1024 * 1024,
            max_keys: 1 << 20,
            max_frame_len: 256 * 1024 * 1024,
        }
    }
}

/// Why a frame was refused.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ProtocolError {
    #[error("unknown command byte {0}")]
    UnknownCommand(u8),
    #[error("key of {len} bytes exceeds the limit of {max} bytes")]
    KeyTooLong { len: u64, max: u64 },
    #[error("value of {len} bytes exceeds the limit of {max} bytes")]
    ValueTooLong { len: u64, max: u64 },
    #[error("{count} keys in one request exceed the limit of {max}")]
    TooManyKeys { count: u64, max: u64 },
    #[error("frame exceeds the limit of {max} bytes")]
    FrameTooLong { max: u64 },
}

/// A list of keys still in wire form (`n × (u64 len, bytes)`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyList<'a> {
    count: usize,
    raw: &'a [u8],
}

impl<'a> KeyList<'a> {
    pub fn len(&self) -> usize {
        self.count
    }
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }
    pub fn iter(&self) -> impl Iterator<Item = &'a [u8]> + 'a {
        let mut rest = self.raw;
        (0..self.count).map(move |_| {
            let (item, tail) = split_string(rest);
            rest = tail;
            item
        })
    }
}

/// Key/value pairs of a MULTI_SET, still in wire form.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PairList<'a> {
    count: usize,
    raw: &'a [u8],
}

impl<'a> PairList<'a> {
    pub fn len(&self) -> usize {
        self.count
    }
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }
    pub fn iter(&self) -> impl Iterator<Item = (&'a [u8], &'a [u8])> + 'a {
        let mut rest = self.raw;
        (0..self.count).map(move |_| {
            let (key, tail) = split_string(rest);
            let (value, tail) = split_string(tail);
            rest = tail;
            (key, value)
        })
    }
}

/// Splits a `u64 len + bytes` string off a slice already validated by the
/// decoder.
fn split_string(buf: &[u8]) -> (&[u8], &[u8]) {
    let len = u64::from_le_bytes(buf[..8].try_into().expect("validated")) as usize;
    buf[8..].split_at(len)
}

/// One decoded request, borrowing from the read buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request<'a> {
    Validate {
        magic: u32,
    },
    Set {
        key: &'a [u8],
        value: &'a [u8],
    },
    CompareSet {
        key: &'a [u8],
        expected: &'a [u8],
        desired: &'a [u8],
    },
    Get {
        key: &'a [u8],
    },
    Add {
        key: &'a [u8],
        delta: i64,
    },
    Check {
        keys: KeyList<'a>,
    },
    Wait {
        keys: KeyList<'a>,
    },
    GetNumKeys,
    DeleteKey {
        key: &'a [u8],
    },
    Append {
        key: &'a [u8],
        value: &'a [u8],
    },
    MultiGet {
        keys: KeyList<'a>,
    },
    MultiSet {
        pairs: PairList<'a>,
    },
    CancelWait,
    Ping {
        nonce: u32,
    },
    QueuePush {
        key: &'a [u8],
        value: &'a [u8],
    },
    QueuePop {
        key: &'a [u8],
    },
    QueueLen {
        key: &'a [u8],
    },
    ListKeys,
    Barrier {
        key: &'a [u8],
        world_size: i64,
    },
}

/// Cursor over a buffer that may end in the middle of a frame.
struct Cursor<'a, 'l> {
    buf: &'a [u8],
    pos: usize,
    limits: &'l Limits,
}

/// `Incomplete` is not an error of the peer: more bytes may complete the frame.
enum Short {
    Incomplete,
    Invalid(ProtocolError),
}

impl From<ProtocolError> for Short {
    fn from(e: ProtocolError) -> Self {
        Short::Invalid(e)
    }
}

impl<'a> Cursor<'a, '_> {
    fn take(&mut self, n: u64) -> Result<&'a [u8], Short> {
        if n > self.limits.max_frame_len || self.pos as u64 + n > self.limits.max_frame_len {
            return Err(ProtocolError::FrameTooLong {
                max: self.limits.max_frame_len,
            }
            .into());
        }
        let n = n as usize;
        if self.buf.len() - self.pos < n {
            return Err(Short::Incomplete);
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, Short> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, Short> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }
    fn u64(&mut self) -> Result<u64, Short> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }
    fn i64(&mut self) -> Result<i64, Short> {
        Ok(self.u64()? as i64)
    }
    fn key(&mut self) -> Result<&'a [u8], Short> {
        let len = self.u64()?;
        if len > self.limits.max_key_len {
            return Err(ProtocolError::KeyTooLong {
                len,
                max: self.limits.max_key_len,
            }
            .into());
        }
        self.take(len)
    }
    fn value(&mut self) -> Result<&'a [u8], Short> {
        let len = self.u64()?;
        if len > self.limits.max_value_len {
            return Err(ProtocolError::ValueTooLong {
                len,
                max: self.limits.max_value_len,
            }
            .into());
        }
        self.take(len)
    }
    fn count(&mut self) -> Result<usize, Short> {
        let count = self.u64()?;
        if count > self.limits.max_keys {
            return Err(ProtocolError::TooManyKeys {
                count,
                max: self.limits.max_keys,
            }
            .into());
        }
        Ok(count as usize)
    }
    fn keys(&mut self) -> Result<KeyList<'a>, Short> {
        let count = self.count()?;
        let start = self.pos;
        for _ in 0..count {
            self.key()?;
        }
        Ok(KeyList {
            count,
            raw: &self.buf[start..self.pos],
        })
    }
    fn pairs(&mut self) -> Result<PairList<'a>, Short> {
        let count = self.count()?;
        let start = self.pos;
        for _ in 0..count {
            self.key()?;
            self.value()?;
        }
        Ok(PairList {
            count,
            raw: &self.buf[start..self.pos],
        })
    }
}

/// Decodes the first request in `buf`.
///
/// `Ok(Some((request, consumed)))` for a whole frame, `Ok(None)` when `buf`
/// holds only the start of one, `Err` when the bytes can never form a valid
/// frame.
pub fn decode<'a>(
    buf: &'a [u8],
    limits: &Limits,
) -> Result<Option<(Request<'a>, usize)>, ProtocolError> {
    let mut c = Cursor {
        buf,
        pos: 0,
        limits,
    };
    match decode_with(&mut c) {
        Ok(req) => Ok(Some((req, c.pos))),
        Err(Short::Incomplete) => Ok(None),
        Err(Short::Invalid(e)) => Err(e),
    }
}

fn decode_with<'a>(c: &mut Cursor<'a, '_>) -> Result<Request<'a>, Short> {
    let cmd = c.u8()?;
    Ok(match cmd {
        code::VALIDATE => Request::Validate { magic: c.u32()? },
        code::SET => Request::Set {
            key: c.key()?,
            value: c.value()?,
        },
        code::COMPARE_SET => Request::CompareSet {
            key: c.key()?,
            expected: c.value()?,
            desired: c.value()?,
        },
        code::GET => Request::Get { key: c.key()? },
        code::ADD => Request::Add {
            key: c.key()?,
            delta: c.i64()?,
        },
        code::CHECK => Request::Check { keys: c.keys()? },
        code::WAIT => Request::Wait { keys: c.keys()? },
        code::GETNUMKEYS => Request::GetNumKeys,
        code::DELETE_KEY => Request::DeleteKey { key: c.key()? },
        code::APPEND => Request::Append {
            key: c.key()?,
            value: c.value()?,
        },
        code::MULTI_GET => Request::MultiGet { keys: c.keys()? },
        code::MULTI_SET => Request::MultiSet { pairs: c.pairs()? },
        code::CANCEL_WAIT => Request::CancelWait,
        code::PING => Request::Ping { nonce: c.u32()? },
        code::QUEUE_PUSH => Request::QueuePush {
            key: c.key()?,
            value: c.value()?,
        },
        code::QUEUE_POP => Request::QueuePop { key: c.key()? },
        code::QUEUE_LEN => Request::QueueLen { key: c.key()? },
        code::LIST_KEYS => Request::ListKeys,
        code::BARRIER => Request::Barrier {
            key: c.key()?,
            world_size: c.i64()?,
        },
        other => return Err(ProtocolError::UnknownCommand(other).into()),
    })
}

/// Appends a `u64 len + bytes` string.
pub fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u64).to_le_bytes());
    out.extend_from_slice(bytes);
}

pub fn put_i64(out: &mut Vec<u8>, v: i64) {
    out.extend_from_slice(&v.to_le_bytes());
}

pub fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}

/// Encodes a request as torch's client sends it. Used by our client and by
/// tests and benchmarks that speak raw bytes.
pub fn encode(req: &Request<'_>, out: &mut Vec<u8>) {
    match *req {
        Request::Validate { magic } => {
            out.push(code::VALIDATE);
            put_u32(out, magic);
        }
        Request::Set { key, value } => {
            out.push(code::SET);
            put_bytes(out, key);
            put_bytes(out, value);
        }
        Request::CompareSet {
            key,
            expected,
            desired,
        } => {
            out.push(code::COMPARE_SET);
            put_bytes(out, key);
            put_bytes(out, expected);
            put_bytes(out, desired);
        }
        Request::Get { key } => {
            out.push(code::GET);
            put_bytes(out, key);
        }
        Request::Add { key, delta } => {
            out.push(code::ADD);
            put_bytes(out, key);
            put_i64(out, delta);
        }
        Request::Check { keys } | Request::Wait { keys } | Request::MultiGet { keys } => {
            out.push(match req {
                Request::Check { .. } => code::CHECK,
                Request::Wait { .. } => code::WAIT,
                _ => code::MULTI_GET,
            });
            out.extend_from_slice(&(keys.count as u64).to_le_bytes());
            out.extend_from_slice(keys.raw);
        }
        Request::GetNumKeys => out.push(code::GETNUMKEYS),
        Request::DeleteKey { key } => {
            out.push(code::DELETE_KEY);
            put_bytes(out, key);
        }
        Request::Append { key, value } => {
            out.push(code::APPEND);
            put_bytes(out, key);
            put_bytes(out, value);
        }
        Request::MultiSet { pairs } => {
            out.push(code::MULTI_SET);
            out.extend_from_slice(&(pairs.count as u64).to_le_bytes());
            out.extend_from_slice(pairs.raw);
        }
        Request::CancelWait => out.push(code::CANCEL_WAIT),
        Request::Ping { nonce } => {
            out.push(code::PING);
            put_u32(out, nonce);
        }
        Request::QueuePush { key, value } => {
            out.push(code::QUEUE_PUSH);
            put_bytes(out, key);
            put_bytes(out, value);
        }
        Request::QueuePop { key } => {
            out.push(code::QUEUE_POP);
            put_bytes(out, key);
        }
        Request::QueueLen { key } => {
            out.push(code::QUEUE_LEN);
            put_bytes(out, key);
        }
        Request::ListKeys => out.push(code::LIST_KEYS),
        Request::Barrier { key, world_size } => {
            out.push(code::BARRIER);
            put_bytes(out, key);
            put_i64(out, world_size);
        }
    }
}

/// Encodes a key-list request (CHECK, WAIT, MULTI_GET) from owned keys.
pub fn encode_keys<K: AsRef<[u8]>>(cmd: u8, keys: &[K], out: &mut Vec<u8>) {
    out.push(cmd);
    out.extend_from_slice(&(keys.len() as u64).to_le_bytes());
    for k in keys {
        put_bytes(out, k.as_ref());
    }
}

/// Encodes a MULTI_SET from owned pairs.
pub fn encode_multi_set<K: AsRef<[u8]>, V: AsRef<[u8]>>(pairs: &[(K, V)], out: &mut Vec<u8>) {
    out.push(code::MULTI_SET);
    out.extend_from_slice(&(pairs.len() as u64).to_le_bytes());
    for (k, v) in pairs {
        put_bytes(out, k.as_ref());
        put_bytes(out, v.as_ref());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    #[test]
    fn decodes_set_capture() {
        // set("k1","v1") from the spec's captures (§9.5).
        let b = hex("01 0300000000000000 2f6b31 0200000000000000 7631");
        let (req, n) = decode(&b, &Limits::default()).unwrap().unwrap();
        assert_eq!(n, b.len());
        assert_eq!(
            req,
            Request::Set {
                key: b"/k1",
                value: b"v1"
            }
        );
    }

    #[test]
    fn every_prefix_of_a_frame_is_incomplete() {
        let b = hex("0b 0200000000000000 0300000000000000 2f6d31 0100000000000000 41 0300000000000000 2f6d32 0200000000000000 4242");
        for cut in 0..b.len() {
            assert_eq!(decode(&b[..cut], &Limits::default()), Ok(None), "cut {cut}");
        }
        let (req, n) = decode(&b, &Limits::default()).unwrap().unwrap();
        assert_eq!(n, b.len());
        let Request::MultiSet { pairs } = req else {
            panic!("not a multi_set")
        };
        let got: Vec<_> = pairs.iter().collect();
        assert_eq!(
            got,
            vec![(&b"/m1"[..], &b"A"[..]), (&b"/m2"[..], &b"BB"[..])]
        );
    }

    #[test]
    fn encode_round_trips() {
        let mut out = Vec::new();
        encode_keys(code::WAIT, &[b"/a".to_vec(), b"/bb".to_vec()], &mut out);
        let (req, n) = decode(&out, &Limits::default()).unwrap().unwrap();
        assert_eq!(n, out.len());
        let mut again = Vec::new();
        encode(&req, &mut again);
        assert_eq!(again, out);
    }

    #[test]
    fn rejects_oversized_and_unknown() {
        let limits = Limits {
            max_key_len: 4,
            ..Limits::default()
        };
        let b = hex("03 0500000000000000");
        assert_eq!(
            decode(&b, &limits),
            Err(ProtocolError::KeyTooLong { len: 5, max: 4 })
        );
        assert_eq!(
            decode(&[99], &limits),
            Err(ProtocolError::UnknownCommand(99))
        );
        let huge = hex("05 ffffffffffffffff");
        assert!(matches!(
            decode(&huge, &limits),
            Err(ProtocolError::TooManyKeys { .. })
        ));
    }
}
