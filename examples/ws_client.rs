//! A WebSocket client to point at tidegate: sends each line of stdin (or a few test messages
//! when stdin is not a terminal... or empty) and prints what comes back.
//!
//!     cargo run --example ws_client -- ws://127.0.0.1:8080/chat
//!     echo hello | cargo run --example ws_client -- ws://127.0.0.1:8080/chat

use std::io::BufRead;

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::args().nth(1).unwrap_or_else(|| "ws://127.0.0.1:8080/chat".to_string());
    let (mut ws, resp) = tokio_tungstenite::connect_async(&url).await?;
    let backend = resp.headers().get("x-backend").and_then(|v| v.to_str().ok()).unwrap_or("?").to_string();
    println!("connected to {url} (status {}, backend {backend})", resp.status());

    let lines: Vec<String> = if std::io::IsTerminal::is_terminal(&std::io::stdin()) {
        println!("type lines to send; Ctrl-D to close");
        std::io::stdin().lock().lines().map_while(Result::ok).collect()
    } else {
        let piped: Vec<String> = std::io::stdin().lock().lines().map_while(Result::ok).collect();
        if piped.is_empty() { vec!["whoami".into(), "hello through tidegate".into()] } else { piped }
    };
    for line in lines {
        ws.send(Message::text(line.clone())).await?;
        match ws.next().await {
            Some(Ok(Message::Text(t))) => println!("< {t}"),
            Some(Ok(other)) => println!("< {other:?}"),
            Some(Err(e)) => return Err(e.into()),
            None => break,
        }
    }
    ws.close(None).await?;
    while let Some(Ok(msg)) = ws.next().await {
        if let Message::Close(frame) = msg {
            println!("closed: {frame:?}");
        }
    }
    Ok(())
}
