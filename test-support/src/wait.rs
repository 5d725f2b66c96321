//! Waiting for a condition with a deadline, instead of sleeping and hoping.

use std::future::Future;
use std::time::{Duration, Instant};

use anyhow::bail;

/// Polls `f` until it returns `Some`, or fails after `timeout` with an error naming `what`.
/// Polls every 5 ms at first (in-process fakes answer at once), backing off to every 50 ms (real
/// services take their time).
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(5);
    loop {
        if let Some(v) = f().await {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::eventually;

    #[tokio::test]
    async fn returns_the_value_once_the_condition_holds_and_names_what_timed_out() {
        let mut polls = 0;
        let v = eventually("three polls", Duration::from_secs(5), || {
            polls += 1;
            let n = polls;
            async move { (n == 3).then_some(n) }
        })
        .await
        .unwrap();
        assert_eq!(v, 3);
        let e = eventually("never", Duration::from_millis(20), || async { None::<()> }).await.unwrap_err();
        assert!(e.to_string().contains("waiting for never"), "{e}");
    }
}
