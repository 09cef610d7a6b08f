//! `cinfer-channel` frames over tokio streams: the header is checked (version,
//! kind, reserved bytes, length against the limit) before the payload is read or
//! allocated, exactly as the blocking `cinfer_channel::read_frame` does.

use cinfer_channel::{Frame, FrameError, HEADER_LEN, Kind, decode_header, encode};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Reads one frame. `Ok(None)` when the stream ends cleanly before a header.
pub async fn read_frame(
    r: &mut (impl AsyncRead + Unpin),
    max_payload: u32,
) -> Result<Option<Frame>, FrameError> {
    let mut header = [0u8; HEADER_LEN];
    let mut got = 0;
    while got < HEADER_LEN {
        match r.read(&mut header[got..]).await? {
            0 if got == 0 => return Ok(None),
            0 => return Err(FrameError::Truncated),
            n => got += n,
        }
    }
    let (kind, len) = decode_header(&header, max_payload)?;
    let mut payload = vec![0u8; len as usize];
    r.read_exact(&mut payload)
        .await
        .map_err(FrameError::reading_payload)?;
    Ok(Some(Frame { kind, payload }))
}

/// Writes one frame and flushes.
pub async fn write_frame(
    w: &mut (impl AsyncWrite + Unpin),
    kind: Kind,
    payload: &[u8],
    max_payload: u32,
) -> Result<(), FrameError> {
    w.write_all(&encode(kind, payload, max_payload)?).await?;
    w.flush().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn round_trip_and_refusals() {
        let mut wire = Vec::new();
        write_frame(&mut wire, Kind::Submit, b"abc", 16)
            .await
            .unwrap();
        write_frame(&mut wire, Kind::Done, b"", 16).await.unwrap();
        let mut r = wire.as_slice();
        let f = read_frame(&mut r, 16).await.unwrap().unwrap();
        assert_eq!((f.kind, f.payload.as_slice()), (Kind::Submit, &b"abc"[..]));
        assert_eq!(
            read_frame(&mut r, 16).await.unwrap().unwrap().kind,
            Kind::Done
        );
        assert!(read_frame(&mut r, 16).await.unwrap().is_none());
        assert!(matches!(
            read_frame(&mut &wire[..5], 16).await,
            Err(FrameError::Truncated)
        ));
        assert!(matches!(
            read_frame(&mut &wire[..9], 16).await,
            Err(FrameError::Truncated)
        ));
        assert!(matches!(
            read_frame(&mut &wire[..], 2).await,
            Err(FrameError::TooLarge { len: 3, max: 2 })
        ));
        assert!(matches!(
            write_frame(&mut Vec::new(), Kind::Submit, b"abc", 2).await,
            Err(FrameError::TooLarge { .. })
        ));
    }
}
