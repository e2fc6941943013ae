//! RoadRunner's goridge frame format (version 1), enough to talk to a
//! RoadRunner PHP worker over its stdin/stdout:
//!
//! ```text
//! byte 0      version (high 4 bits) | header length in 32-bit words (low 4)
//! byte 1      flags (CONTROL 0x01, CODEC_RAW 0x04, CODEC_JSON 0x08, ERROR 0x40)
//! bytes 2-5   payload length, u32 little-endian
//! bytes 6-9   CRC-32 (IEEE) of bytes 0-5, little-endian
//! bytes 10-11 reserved
//! then        options, u32 little-endian each; then the payload
//! ```
//!
//! A task is a frame whose options\[0\] is the context length and whose
//! payload is context then body, as RoadRunner lays out its payloads.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

pub const CONTROL: u8 = 0x01;
pub const CODEC_JSON: u8 = 0x08;
pub const ERROR: u8 = 0x40;

const VERSION: u8 = 1;
const HEADER: usize = 12;

/// Frames larger than this from a worker are a protocol error: a broken
/// worker must not make us allocate gigabytes.
pub const MAX_PAYLOAD: usize = 64 * 1024 * 1024;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub flags: u8,
    pub options: Vec<u32>,
    pub payload: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("bad header CRC")]
    Crc,
    #[error("unsupported frame version {0}")]
    Version(u8),
    #[error("bad header length {0}")]
    HeaderLength(u8),
    #[error("payload of {0} bytes is over the limit")]
    TooLarge(usize),
}

impl Frame {
    /// A task: `context` then `body`, options\[0\] = context length.
    pub fn task(context: &[u8], body: &[u8]) -> Frame {
        let mut payload = Vec::with_capacity(context.len() + body.len());
        payload.extend_from_slice(context);
        payload.extend_from_slice(body);
        Frame {
            flags: CODEC_JSON,
            options: vec![context.len() as u32],
            payload,
        }
    }

    pub fn control(json: &[u8]) -> Frame {
        Frame {
            flags: CONTROL | CODEC_JSON,
            options: Vec::new(),
            payload: json.to_vec(),
        }
    }

    /// (context, body) of a task or response frame.
    pub fn split(&self) -> (&[u8], &[u8]) {
        let at = self
            .options
            .first()
            .map_or(0, |&n| (n as usize).min(self.payload.len()));
        self.payload.split_at(at)
    }

    pub fn encode(&self) -> Vec<u8> {
        let hl = 3 + self.options.len() as u8;
        let mut out = Vec::with_capacity(HEADER + self.options.len() * 4 + self.payload.len());
        out.push(VERSION << 4 | hl);
        out.push(self.flags);
        out.extend_from_slice(&(self.payload.len() as u32).to_le_bytes());
        let crc = crc32(&out[..6]);
        out.extend_from_slice(&crc.to_le_bytes());
        out.extend_from_slice(&[0, 0]);
        for option in &self.options {
            out.extend_from_slice(&option.to_le_bytes());
        }
        out.extend_from_slice(&self.payload);
        out
    }

    pub async fn write_to<W: AsyncWrite + Unpin>(&self, w: &mut W) -> std::io::Result<()> {
        w.write_all(&self.encode()).await?;
        w.flush().await
    }

    pub async fn read_from<R: AsyncRead + Unpin>(r: &mut R) -> Result<Frame, FrameError> {
        let mut header = [0u8; HEADER];
        r.read_exact(&mut header).await?;
        let version = header[0] >> 4;
        if version != VERSION {
            return Err(FrameError::Version(version));
        }
        let hl = header[0] & 0x0f;
        if hl < 3 {
            return Err(FrameError::HeaderLength(hl));
        }
        let expected = u32::from_le_bytes([header[6], header[7], header[8], header[9]]);
        if crc32(&header[..6]) != expected {
            return Err(FrameError::Crc);
        }
        let len = u32::from_le_bytes([header[2], header[3], header[4], header[5]]) as usize;
        if len > MAX_PAYLOAD {
            return Err(FrameError::TooLarge(len));
        }
        let mut options = Vec::new();
        for _ in 3..hl {
            let mut word = [0u8; 4];
            r.read_exact(&mut word).await?;
            options.push(u32::from_le_bytes(word));
        }
        let mut payload = vec![0u8; len];
        r.read_exact(&mut payload).await?;
        Ok(Frame {
            flags: header[1],
            options,
            payload,
        })
    }
}

/// CRC-32 (IEEE 802.3, reflected, as Go's `crc32.ChecksumIEEE` and PHP's
/// `crc32()`); only ever run over six header bytes, so a table buys nothing.
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = 0xffff_ffffu32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc_matches_the_ieee_check_value() {
        assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
    }

    #[tokio::test]
    async fn frames_round_trip() {
        let frame = Frame::task(br#"{"a":1}"#, b"body");
        let bytes = frame.encode();
        assert_eq!(bytes[0], 0x14, "version 1, four words of header");
        assert_eq!(&bytes[12..16], &7u32.to_le_bytes());
        let back = Frame::read_from(&mut &bytes[..]).await.unwrap();
        assert_eq!(back, frame);
        assert_eq!(back.split(), (&br#"{"a":1}"#[..], &b"body"[..]));
    }

    #[tokio::test]
    async fn corrupt_headers_are_refused() {
        let mut bytes = Frame::control(br#"{"pid":true}"#).encode();
        bytes[3] ^= 1;
        assert!(matches!(
            Frame::read_from(&mut &bytes[..]).await,
            Err(FrameError::Crc)
        ));
        let short = &Frame::control(b"{}").encode()[..8];
        assert!(matches!(
            Frame::read_from(&mut &short[..]).await,
            Err(FrameError::Io(_))
        ));
    }
}
