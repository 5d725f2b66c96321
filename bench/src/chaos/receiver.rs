//! A local webhook receiver: answers 200 to every delivery and records when each arrived, per
//! notification id (the `Taskstream-Delivery` header: one delivery per notification).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::Router;

#[derive(Clone, Default)]
pub struct Receiver {
    arrivals: Arc<Mutex<HashMap<String, Vec<Instant>>>>,
}

impl Receiver {
    /// Starts the receiver on a free local port; returns it and the URL to register.
    pub async fn start() -> anyhow::Result<(Self, String)> {
        let receiver = Self::default();
        let app = Router::new().route("/hook", post(deliver)).with_state(receiver.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}/hook", listener.local_addr()?);
        tokio::spawn(async move { axum::serve(listener, app).await });
        Ok((receiver, url))
    }

    /// When each delivery arrived, per notification id.
    pub fn arrivals(&self) -> HashMap<String, Vec<Instant>> {
        self.arrivals.lock().expect("arrivals").clone()
    }
}

async fn deliver(State(r): State<Receiver>, headers: HeaderMap) -> StatusCode {
    let id = headers.get("taskstream-delivery").and_then(|v| v.to_str().ok()).unwrap_or("(none)").to_owned();
    r.arrivals.lock().expect("arrivals").entry(id).or_default().push(Instant::now());
    StatusCode::OK
}
