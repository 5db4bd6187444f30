//! `np end-sessions`: asks a device this identity manages to end every live session of another
//! identity, and waits for its signed answer.

use anyhow::Context;
use np_identity::home::Home;
use np_identity::{DeviceRef, Name};
use np_tunnel::msg::TunnelMsg;
use np_tunnel::Router;
use std::time::Duration;

/// How long the request may wait at the control plane for an absent device.
const SEND_TTL: Duration = Duration::from_secs(30);
/// How long to wait for the device's answer before saying it is probably not running.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// Asks `to` to end the sessions of `of`, as `me`, and prints how many it ended.
pub async fn run(home: &Home, me: Option<&Name>, to: &DeviceRef, of: &Name) -> anyhow::Result<()> {
    let (ctl, incoming) = crate::connect_control(home, me).await?;
    let (router, _requests) = Router::start(incoming);
    let mut request_id = [0u8; 16];
    np_identity::random_bytes(&mut request_id)?;
    let answer = router.expect(request_id);
    let msg = TunnelMsg::EndSessions { request_id, device: to.device.clone(), identity: of.clone() };
    ctl.send(&to.identity, &msg.encode(), SEND_TTL).await.with_context(|| format!("asking {to}"))?;
    let a = tokio::time::timeout(ANSWER_TIMEOUT, answer)
        .await
        .map_err(|_| anyhow::anyhow!("{to} did not answer within {}s: is its npd running?", ANSWER_TIMEOUT.as_secs()))?
        .map_err(|_| anyhow::anyhow!("no answer from {to}"))?;
    match a.msg {
        TunnelMsg::SessionsEnded { result: Ok(n), .. } if a.from == to.identity => {
            println!("{to} ended {n} session(s) of {of}");
            Ok(())
        }
        TunnelMsg::SessionsEnded { result: Err(e), .. } => anyhow::bail!("{to} refused: {e}"),
        _ => anyhow::bail!("unexpected answer from {}", a.from),
    }
}
