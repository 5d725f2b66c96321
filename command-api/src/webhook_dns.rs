//! SSRF guard for webhook URLs that name a host: every address the name resolves to must be public.

use std::net::IpAddr;

use domain::user::{host_port, is_forbidden_address};

/// Resolves the URL's host; refuses it when it does not resolve or any address is not public.
pub async fn check_resolves_publicly(url: &str) -> Result<Vec<IpAddr>, String> {
    let (host, port) = host_port(url).ok_or("must have a host")?;
    if let Ok(ip) = host.parse::<IpAddr>() {
        return if is_forbidden_address(ip) { Err("must not point at a non-public address".into()) } else { Ok(vec![ip]) };
    }
    let addrs: Vec<IpAddr> = tokio::time::timeout(std::time::Duration::from_secs(3), tokio::net::lookup_host((host.as_str(), port)))
        .await
        .map_err(|_| format!("{host} could not be resolved in time"))?
        .map_err(|_| format!("{host} does not resolve"))?
        .map(|a| a.ip())
        .collect();
    if addrs.is_empty() {
        return Err(format!("{host} does not resolve"));
    }
    if addrs.iter().any(|ip| is_forbidden_address(*ip)) {
        return Err(format!("{host} resolves to a non-public address"));
    }
    Ok(addrs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn names_that_resolve_to_loopback_are_refused() {
        assert!(check_resolves_publicly("http://localhost:9/hook").await.is_err());
        assert!(check_resolves_publicly("http://127.0.0.1/hook").await.is_err());
    }
}
