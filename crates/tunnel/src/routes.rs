//! LAN routes a device offers (`npd --advertise-route 192.168.1.0/24`): published in a record of
//! their own, `routes/NAME`, readable by whoever may read the device's info. A record apart from
//! [`DeviceInfo`](crate::DeviceInfo), so readers of older device records still decode them.
//!
//! An advertisement is only an offer. A client uses a prefix only once its user accepted the
//! device's routes (`np up --accept-routes`), and vets each one first: a device must not be able
//! to take the client's default route, its np subnet, or another device's prefixes.

use std::time::Duration;

use np_control_client::ControlClient;
use np_identity::Name;
use serde::{Deserialize, Serialize};

/// Record `routes/NAME`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceRoutes {
    pub device: String,
    /// CIDR prefixes, e.g. `192.168.1.0/24`.
    pub routes: Vec<String>,
}

/// Record key of a device's [`DeviceRoutes`].
pub fn routes_key(device: &str) -> String {
    format!("routes/{device}")
}

/// Publishes what `device` advertises (an empty list withdraws an earlier advertisement),
/// trying again until the control plane takes it.
pub async fn publish(ctl: &ControlClient, device: &str, routes: &[String], readers: Vec<Name>) {
    let value = DeviceRoutes { device: device.to_string(), routes: routes.to_vec() };
    let value = postcard::to_stdvec(&value).unwrap_or_default();
    let mut wait = Duration::from_millis(500);
    loop {
        match ctl.publish(&routes_key(device), value.clone(), readers.clone()).await {
            Ok(()) => {
                tracing::info!(device, routes = %routes.join(","), "advertised routes published");
                return;
            }
            Err(e) => tracing::warn!(error = %e, "could not publish the advertised routes; will retry"),
        }
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(Duration::from_secs(30));
    }
}
