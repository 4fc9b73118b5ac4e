//! Connection admission, one policy for every listener of the service (device TCP listeners,
//! the embedded MQTT endpoint, the OsmAnd and dashboard HTTP servers): a per-IP and a total
//! limit on concurrent connections. A permit is held for the life of the connection and
//! released on drop.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// Why a connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitExceeded {
    PerIp,
    Total,
}

impl LimitExceeded {
    pub fn as_str(self) -> &'static str {
        match self {
            LimitExceeded::PerIp => "per_ip_limit",
            LimitExceeded::Total => "total_limit",
        }
    }
}

#[derive(Default)]
struct Counts {
    per_ip: HashMap<IpAddr, usize>,
    total: usize,
}

/// Shared connection counter (one per listener, or shared by all).
#[derive(Clone)]
pub struct ConnectionLimiter {
    max_per_ip: usize,
    max_total: usize,
    counts: Arc<Mutex<Counts>>,
}

/// Held while a connection is open.
pub struct ConnectionPermit {
    ip: IpAddr,
    counts: Arc<Mutex<Counts>>,
}

impl ConnectionLimiter {
    /// `0` means unlimited for either limit.
    pub fn new(max_per_ip: usize, max_total: usize) -> Self {
        ConnectionLimiter {
            max_per_ip,
            max_total,
            counts: Arc::new(Mutex::new(Counts::default())),
        }
    }

    pub fn try_acquire(&self, ip: IpAddr) -> Result<ConnectionPermit, LimitExceeded> {
        let mut c = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        if self.max_total > 0 && c.total >= self.max_total {
            return Err(LimitExceeded::Total);
        }
        let n = c.per_ip.get(&ip).copied().unwrap_or(0);
        if self.max_per_ip > 0 && n >= self.max_per_ip {
            return Err(LimitExceeded::PerIp);
        }
        c.per_ip.insert(ip, n + 1);
        c.total += 1;
        Ok(ConnectionPermit {
            ip,
            counts: self.counts.clone(),
        })
    }

    /// Open connections from `ip`.
    pub fn count(&self, ip: IpAddr) -> usize {
        let c = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        c.per_ip.get(&ip).copied().unwrap_or(0)
    }
}

impl Drop for ConnectionPermit {
    fn drop(&mut self) {
        let mut c = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        c.total = c.total.saturating_sub(1);
        if let Some(n) = c.per_ip.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                c.per_ip.remove(&self.ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_ip_and_total_limits_and_release() {
        let l = ConnectionLimiter::new(2, 3);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let p1 = l.try_acquire(a).unwrap();
        let _p2 = l.try_acquire(a).unwrap();
        assert_eq!(l.try_acquire(a).err(), Some(LimitExceeded::PerIp));
        let _p3 = l.try_acquire(b).unwrap();
        assert_eq!(l.try_acquire(b).err(), Some(LimitExceeded::Total));
        drop(p1);
        assert_eq!(l.count(a), 1);
        assert!(l.try_acquire(b).is_ok());
    }

    #[test]
    fn zero_is_unlimited() {
        let l = ConnectionLimiter::new(0, 0);
        let a: IpAddr = "::1".parse().unwrap();
        let permits: Vec<_> = (0..100).map(|_| l.try_acquire(a).unwrap()).collect();
        assert_eq!(l.count(a), 100);
        drop(permits);
        assert_eq!(l.count(a), 0);
    }
}
