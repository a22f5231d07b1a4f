//! TCP throughput probe for `bench/proxy.sh`.
//!
//! `tcp_throughput sink LISTEN` accepts connections, reads each to end of input, then answers
//! with the byte count (8 bytes, big endian) and closes.
//! `tcp_throughput push ADDR MIB [STREAMS]` sends MIB MiB over STREAMS parallel connections
//! (default 1), half-closes, waits for the counts, and prints `MiB seconds MiB/s`.

use std::error::Error;
use std::time::Instant;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const CHUNK: usize = 256 * 1024;

async fn sink(listen: &str) -> Result<(), Box<dyn Error>> {
    let l = TcpListener::bind(listen).await?;
    println!("sink listening on {}", l.local_addr()?);
    loop {
        let (mut s, _) = l.accept().await?;
        tokio::spawn(async move {
            let mut buf = vec![0u8; CHUNK];
            let mut total = 0u64;
            loop {
                match s.read(&mut buf).await {
                    Ok(0) => break,
                    Ok(n) => total += n as u64,
                    Err(_) => return,
                }
            }
            let _ = s.write_all(&total.to_be_bytes()).await;
            let _ = s.shutdown().await;
        });
    }
}

async fn push_one(addr: String, bytes: u64) -> Result<u64, Box<dyn Error + Send + Sync>> {
    let mut s = TcpStream::connect(&addr).await?;
    s.set_nodelay(true)?;
    let buf = vec![0x5au8; CHUNK];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(CHUNK as u64) as usize;
        s.write_all(&buf[..n]).await?;
        left -= n as u64;
    }
    s.shutdown().await?;
    let mut count = [0u8; 8];
    s.read_exact(&mut count).await?;
    Ok(u64::from_be_bytes(count))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
        ["sink", listen] => sink(listen).await,
        ["push", addr, mib, rest @ ..] => {
            let mib: u64 = mib.parse()?;
            let streams: u64 = rest.first().map(|s| s.parse()).transpose()?.unwrap_or(1).max(1);
            let per = mib * 1024 * 1024 / streams;
            let start = Instant::now();
            let tasks: Vec<_> = (0..streams).map(|_| tokio::spawn(push_one(addr.to_string(), per))).collect();
            let mut got = 0u64;
            for t in tasks {
                got += t.await?.map_err(|e| e.to_string())?;
            }
            let secs = start.elapsed().as_secs_f64();
            if got != per * streams {
                return Err(format!("sink counted {got} bytes, sent {}", per * streams).into());
            }
            let mib_sent = (per * streams) as f64 / (1024.0 * 1024.0);
            println!("{mib_sent:.0} {secs:.3} {:.0}", mib_sent / secs);
            Ok(())
        }
        _ => Err("usage: tcp_throughput sink LISTEN | push ADDR MIB [STREAMS]".into()),
    }
}
