//! The null server on the design card's runtime: one pinned glommio
//! executor that accepts and answers every RCP frame at once with an empty
//! `ok`, as `null_server` does with a thread per connection. The gap
//! between the two is what glommio's reactor costs per request by itself
//! (its floor for any server built on it), which `docs/PERFORMANCE.md`
//! compares with ours and with the reference.

use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::{TcpListener, TcpStream};
use glommio::{LocalExecutorBuilder, Placement};

use crate::null_server::{answer, frame_len, HEADER};

/// Read buffer per connection; a frame larger than this grows it.
const READ_CHUNK: usize = 64 * 1024;

/// Serves until the process is killed, on one executor pinned to CPU 0.
pub fn serve(bind: &str) -> std::io::Result<()> {
    let bind = bind.to_owned();
    let handle = LocalExecutorBuilder::new(Placement::Fixed(0))
        .name("null-glommio")
        .spawn(move || async move {
            let listener = bind_retrying(&bind).await?;
            eprintln!(
                "null server (glommio) listening on {}",
                listener.local_addr()?
            );
            loop {
                let stream = listener.accept().await?;
                glommio::spawn_local(async move {
                    let _ = connection(stream).await;
                })
                .detach();
            }
        })
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    handle
        .join()
        .map_err(|_| std::io::Error::other("executor panicked"))?
}

/// Binds, retrying for a few seconds while the address is still held by
/// the previous server of a bench run (its sockets linger briefly).
async fn bind_retrying(bind: &str) -> std::io::Result<TcpListener> {
    let mut tries = 0;
    loop {
        match TcpListener::bind(bind) {
            Ok(listener) => return Ok(listener),
            Err(_) if tries < 100 => {
                tries += 1;
                glommio::timer::sleep(std::time::Duration::from_millis(50)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

async fn connection(mut stream: TcpStream) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let mut buf = vec![0u8; READ_CHUNK];
    let mut filled = 0;
    let mut out = Vec::with_capacity(READ_CHUNK);
    loop {
        if filled == buf.len() {
            buf.resize(buf.len() * 2, 0);
        }
        let n = stream.read(&mut buf[filled..]).await?;
        if n == 0 {
            return Ok(());
        }
        filled += n;
        let mut start = 0;
        // Answer every complete frame read so far in one write.
        while let Some(len) = frame_len(&buf[start..filled])? {
            answer(&buf[start + HEADER..start + len], &mut out);
            start += len;
        }
        buf.copy_within(start..filled, 0);
        filled -= start;
        if !out.is_empty() {
            stream.write_all(&out).await?;
            out.clear();
        }
    }
}
