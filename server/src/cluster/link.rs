//! One long-lived `DecideStream` to a peer, carrying the one-owner state
//! steps of many checks: a unary call per step costs an HTTP/2 stream, its
//! headers and a task switch on both sides; a step on an open stream costs
//! a message. Steps are tagged; a reader task hands each answer to the
//! check waiting for it. A broken stream fails every step waiting on it
//! (they are routed again) and the next step opens a new one.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use warden_client::proto::peer_client::PeerClient;
use warden_client::proto::{StateStep, StateVerdict, TaggedStep};

/// Steps queued towards one peer before senders wait.
const QUEUE: usize = 1024;

/// An open stream to one peer.
pub struct PeerLink {
    steps: mpsc::Sender<TaggedStep>,
    waiting: Arc<Mutex<HashMap<u64, oneshot::Sender<StateVerdict>>>>,
    next_tag: AtomicU64,
    broken: Arc<AtomicBool>,
}

impl PeerLink {
    /// Opens the stream (lazily: the channel connects on first use).
    pub fn open(mut client: PeerClient<Channel>) -> Arc<Self> {
        let (steps, queued) = mpsc::channel(QUEUE);
        let waiting: Arc<Mutex<HashMap<u64, oneshot::Sender<StateVerdict>>>> = Arc::default();
        let broken = Arc::new(AtomicBool::new(false));
        let link = Arc::new(Self {
            steps,
            waiting: waiting.clone(),
            next_tag: AtomicU64::new(1),
            broken: broken.clone(),
        });
        tokio::spawn(async move {
            if let Ok(answers) = client.decide_stream(ReceiverStream::new(queued)).await {
                let mut answers = answers.into_inner();
                while let Ok(Some(answer)) = answers.message().await {
                    let waiter = waiting.lock().remove(&answer.tag);
                    if let (Some(waiter), Some(verdict)) = (waiter, answer.verdict) {
                        let _ = waiter.send(verdict);
                    }
                }
            }
            broken.store(true, Ordering::SeqCst);
            // Dropping the senders fails every step still waiting.
            waiting.lock().clear();
        });
        link
    }

    /// Whether the stream ended (a new link is needed).
    pub fn is_broken(&self) -> bool {
        self.broken.load(Ordering::SeqCst)
    }

    /// Sends one step and waits up to `timeout` for its verdict; `None`
    /// when the stream broke or the peer did not answer in time.
    pub async fn decide(&self, step: StateStep, timeout: Duration) -> Option<StateVerdict> {
        let tag = self.next_tag.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.waiting.lock().insert(tag, tx);
        let sent = tokio::time::timeout(
            timeout,
            self.steps.send(TaggedStep {
                tag,
                step: Some(step),
            }),
        )
        .await;
        if !matches!(sent, Ok(Ok(()))) {
            self.waiting.lock().remove(&tag);
            return None;
        }
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(verdict)) => Some(verdict),
            _ => {
                self.waiting.lock().remove(&tag);
                None
            }
        }
    }
}
