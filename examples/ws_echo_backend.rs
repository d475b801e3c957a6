//! A WebSocket + HTTP echo backend to put behind tidegate (the same server `tidegate demo`
//! starts): `GET` says which backend answered, `POST` echoes its body, WebSocket messages
//! are echoed and `whoami` is answered with the backend's name.
//!
//!     cargo run --example ws_echo_backend -- 127.0.0.1:9101 backend-1

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let addr = std::env::args().nth(1).unwrap_or_else(|| "127.0.0.1:9101".to_string()).parse()?;
    let name = std::env::args().nth(2).unwrap_or_else(|| "backend".to_string());
    let (local, task) = tidegate::demo::spawn_backend(&name, addr).await?;
    println!("{name} listening on {local}");
    task.await?;
    Ok(())
}
