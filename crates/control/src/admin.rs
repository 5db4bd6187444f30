//! The operator's local channel: a Unix socket in the data directory (mode 0600, so only the
//! operator's account reaches it) through which `np-control enroll` asks the running server for a
//! code. When no server runs, the tool opens the database itself: the redb file in the data
//! directory, or the PostgreSQL database its `--store` names.

use crate::store::{Location, Quota, Store, StoreError};
use anyhow::{bail, Context, Result};
use np_control_proto::{AdminReply, AdminRequest, EnrolCode};
use np_identity::Name;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::UnixStream;

pub(crate) const SOCKET: &str = "admin.sock";

/// Creates a code: a random secret stored (hashed) in the database, with the certificate pin.
pub(crate) async fn new_code(store: &Store, cert_der: &[u8], name: &Name, ttl: Duration) -> Result<String, StoreError> {
    let mut secret = [0u8; 16];
    np_identity::random_bytes(&mut secret).map_err(|e| StoreError::Limit(e.to_string()))?;
    store.issue_code(name, secret, crate::now_ms().saturating_add(ttl.as_millis() as u64)).await?;
    let mut cert_sha256 = [0u8; 32];
    cert_sha256.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, cert_der).as_ref());
    Ok(EnrolCode { secret, cert_sha256 }.to_string())
}

/// Serves admin requests until the listener fails.
pub(crate) async fn serve(
    listener: tokio::net::UnixListener,
    shared: Arc<crate::state::Shared>,
    cert_der: Arc<Vec<u8>>,
) {
    loop {
        let Ok((mut s, _)) = listener.accept().await else {
            return;
        };
        let (shared, cert) = (shared.clone(), cert_der.clone());
        tokio::spawn(async move {
            let req: AdminRequest = match np_wire::io::read_msg(&mut s, 4096).await {
                Ok(Some(r)) => r,
                _ => return,
            };
            let reply = match req {
                AdminRequest::IssueCode { name, ttl_secs } => {
                    match new_code(&shared.store, &cert, &name, Duration::from_secs(ttl_secs)).await {
                        Ok(code) => {
                            tracing::info!("issued an enrolment code");
                            AdminReply::Code(code)
                        }
                        Err(e) => AdminReply::Error(e.to_string()),
                    }
                }
                AdminRequest::Revoke { name } => match shared.store.revoke(&name).await {
                    Ok(true) => {
                        shared.hub.close_all(&name);
                        tracing::warn!(%name, "identity revoked");
                        AdminReply::Revoked
                    }
                    Ok(false) => AdminReply::Error(format!("{name} is not enrolled")),
                    Err(e) => AdminReply::Error(e.to_string()),
                },
                AdminRequest::RelayAdd { .. } | AdminRequest::RelayRemove { .. } | AdminRequest::RelayList => {
                    match relay_op(&shared.store, &req).await {
                        Ok(list) => AdminReply::Relays(list),
                        Err(e) => AdminReply::Error(e.to_string()),
                    }
                }
            };
            let _ = np_wire::io::write_msg(&mut s, &reply).await;
        });
    }
}

/// Sends `req` to the running server's admin socket and returns its answer (an `Error` answer
/// as an error); `None` when no server listens there, so the caller opens the database itself.
async fn ask_running_server(data: &Path, req: &AdminRequest) -> Result<Option<AdminReply>> {
    let Ok(mut s) = UnixStream::connect(data.join(SOCKET)).await else {
        return Ok(None);
    };
    np_wire::io::write_msg(&mut s, req).await.context("asking the running server")?;
    match np_wire::io::read_msg::<AdminReply, _>(&mut s, 64 * 1024).await {
        Ok(Some(AdminReply::Error(e))) => bail!("{e}"),
        Ok(Some(reply)) => Ok(Some(reply)),
        _ => bail!("the running server closed the admin socket without an answer"),
    }
}

/// The database of a stopped server, for the admin commands: the redb file in `data`, or the
/// PostgreSQL database `store` names (an error if the server never ran there). The certificate
/// must exist too, since a code pins it.
async fn open_stopped(data: &Path, store: Option<&str>) -> Result<Store> {
    let at = Location::parse(store, data.join(crate::state::DB_FILE))?;
    let never_ran = match &at {
        Location::Embedded(file) => !file.exists(),
        Location::Postgres(_) => !data.join("cert.der").exists(),
    };
    if never_ran {
        bail!(
            "no control-plane data in {}: start the server first with `np-control serve --data {}`",
            data.display(),
            data.display()
        );
    }
    Ok(Store::open(&at, Quota::default()).await?)
}

/// Issues a code for `name`: through the running server's admin socket, or directly in the
/// database (`store`, as `serve --store` takes it) when no server is running.
pub async fn issue_code(data: &Path, store: Option<&str>, name: &Name, ttl: Duration) -> Result<String> {
    let req = AdminRequest::IssueCode { name: name.clone(), ttl_secs: ttl.as_secs() };
    match ask_running_server(data, &req).await? {
        Some(AdminReply::Code(c)) => return Ok(c),
        Some(other) => bail!("unexpected answer from the running server: {other:?}"),
        None => {}
    }
    let store = open_stopped(data, store).await?;
    let tls = crate::tls::TlsIdentity::load_or_create(data)?;
    Ok(new_code(&store, &tls.cert_der, name, ttl).await?)
}

/// Revokes `name`: through the running server (which also closes its connections), or directly
/// in the database (`store`) when no server is running.
pub async fn revoke(data: &Path, store: Option<&str>, name: &Name) -> Result<()> {
    match ask_running_server(data, &AdminRequest::Revoke { name: name.clone() }).await? {
        Some(AdminReply::Revoked) => return Ok(()),
        Some(other) => bail!("unexpected answer from the running server: {other:?}"),
        None => {}
    }
    if !open_stopped(data, store).await?.revoke(name).await? {
        bail!("{name} is not enrolled");
    }
    Ok(())
}

/// Applies a relay-list request; returns the list after it.
async fn relay_op(store: &Store, req: &AdminRequest) -> Result<Vec<Name>, StoreError> {
    match req {
        AdminRequest::RelayAdd { name } => store.relay_add(name, crate::now_ms()).await?,
        AdminRequest::RelayRemove { name } if !store.relay_remove(name).await? => {
            return Err(StoreError::Limit(format!("{name} is not on the relay list")));
        }
        _ => {}
    }
    store.relays().await
}

/// Changes or reads the relay list (`req` is one of the relay requests): through the running
/// server, or directly in the database (`store`) when no server is running. Returns the list
/// after it.
pub async fn relays(data: &Path, store: Option<&str>, req: AdminRequest) -> Result<Vec<Name>> {
    match ask_running_server(data, &req).await? {
        Some(AdminReply::Relays(list)) => Ok(list),
        Some(other) => bail!("unexpected answer from the running server: {other:?}"),
        None => Ok(relay_op(&open_stopped(data, store).await?, &req).await?),
    }
}
