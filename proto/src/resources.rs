//! Resource requests: pause/resume (cgroup v2 freezer), live updates of a
//! container's limits (`runc update`) and statistics (`runc events`).
//!
//! [`ResourcesUpdate`] is a subset of the OCI `linux.resources` object with
//! the spec's field names, so `runc update -r FILE` JSON decodes into it
//! unchanged (fields outside the subset are ignored). [`Stats`] serializes
//! in the shape of runc's `events --stats` `data` object, so the host can
//! print it as it comes.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// `linux.resources.memory` (the part `update` changes). Negative values
/// mean "no limit" (`max`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryUpdate {
    /// Bytes: `memory.max`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<i64>,
    /// Bytes: `memory.low`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reservation: Option<i64>,
    /// Memory + swap in bytes, as in the OCI spec; the agent writes
    /// `memory.swap.max` = swap - limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub swap: Option<i64>,
}

/// `linux.resources.cpu` (the part `update` changes).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuUpdate {
    /// Relative weight (cgroup v1 shares, converted to `cpu.weight` like runc).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shares: Option<u64>,
    /// Microseconds per period (`cpu.max`; negative: no limit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quota: Option<i64>,
    /// Period in microseconds (`cpu.max`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub period: Option<u64>,
    /// `cpuset.cpus`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<String>,
    /// `cpuset.mems`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mems: Option<String>,
}

/// `linux.resources.pids`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PidsUpdate {
    /// `pids.max` (negative: no limit; 0: unchanged, like runc).
    #[serde(default)]
    pub limit: i64,
}

/// `linux.resources.blockIO` (the weight only).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockIoUpdate {
    /// 10..=1000 (`io.weight`, converted like runc).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u16>,
}

/// The OCI `linux.resources` subset `UpdateContainer` applies.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResourcesUpdate {
    /// Memory limits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<MemoryUpdate>,
    /// CPU limits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<CpuUpdate>,
    /// Process count limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pids: Option<PidsUpdate>,
    /// Block I/O weight.
    #[serde(default, rename = "blockIO", skip_serializing_if = "Option::is_none")]
    pub block_io: Option<BlockIoUpdate>,
}

/// `UpdateContainer`: like `runc update`. Either every value is applied,
/// or none (values written before a refused one are restored).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpdateContainerRequest {
    /// Container id.
    pub id: String,
    /// New limits; absent fields stay as they are.
    pub resources: ResourcesUpdate,
}

/// CPU time in nanoseconds (runc's `cpu.usage`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuUsage {
    /// Total CPU time.
    pub total: u64,
    /// In the kernel.
    pub kernel: u64,
    /// In user mode.
    pub user: u64,
}

/// CFS bandwidth throttling (runc's `cpu.throttling`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Throttling {
    /// Enforcement periods elapsed.
    pub periods: u64,
    /// Periods in which the cgroup was throttled.
    pub throttled_periods: u64,
    /// Nanoseconds throttled.
    pub throttled_time: u64,
}

/// runc's `cpu` stats.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuStats {
    /// Usage.
    pub usage: CpuUsage,
    /// Throttling.
    pub throttling: Throttling,
}

/// One memory counter (runc's `MemoryEntry`). Unlimited is `u64::MAX`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryEntry {
    /// Limit in bytes.
    pub limit: u64,
    /// Current usage in bytes.
    pub usage: u64,
    /// Peak usage in bytes (`memory.peak`; 0 when the kernel lacks it).
    pub max: u64,
    /// How often the limit was hit (`memory.events` `max`).
    pub failcnt: u64,
}

/// runc's `memory` stats.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryStats {
    /// Page cache bytes (`memory.stat` `file`).
    pub cache: u64,
    /// `memory.current` / `memory.max`.
    pub usage: MemoryEntry,
    /// Memory + swap, as runc reports it on cgroup v2.
    pub swap: MemoryEntry,
    /// `memory.stat`, key by key.
    pub raw: BTreeMap<String, u64>,
}

/// runc's `pids` stats.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PidsStats {
    /// Processes in the cgroup.
    pub current: u64,
    /// `pids.max` (0: no limit, like runc).
    pub limit: u64,
}

/// A container's statistics, in the shape of runc's `events --stats`
/// `data` object.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    /// CPU.
    pub cpu: CpuStats,
    /// Memory.
    pub memory: MemoryStats,
    /// Pids.
    pub pids: PidsStats,
}

/// Answer to `ContainerStats`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerStats {
    /// runc-shaped statistics.
    pub stats: Stats,
    /// `memory.events` `oom_kill`: processes the OOM killer killed in the
    /// container so far (the host reports an `oom` event when it grows).
    #[serde(default)]
    pub oom_kills: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::container::ContainerRef;
    use crate::{decode_request, RequestBody, ResponseBody};

    #[test]
    fn runc_update_json_decodes() {
        // What `runc update -r` reads: OCI names, extra fields ignored.
        let r: ResourcesUpdate = serde_json::from_str(
            r#"{"memory":{"limit":1048576,"swap":-1,"kernel":0},
                "cpu":{"shares":512,"quota":20000,"period":100000,"cpus":"0","realtimeRuntime":0},
                "pids":{"limit":10},"blockIO":{"weight":300,"weightDevice":[]}}"#,
        )
        .unwrap();
        assert_eq!(r.memory.as_ref().unwrap().limit, Some(1_048_576));
        assert_eq!(r.memory.as_ref().unwrap().swap, Some(-1));
        assert_eq!(r.cpu.as_ref().unwrap().cpus.as_deref(), Some("0"));
        assert_eq!(r.pids.as_ref().unwrap().limit, 10);
        assert_eq!(r.block_io.as_ref().unwrap().weight, Some(300));
        let empty: ResourcesUpdate = serde_json::from_str("{}").unwrap();
        assert_eq!(empty, ResourcesUpdate::default());
    }

    #[test]
    fn resource_requests_wire_format() {
        let r = decode_request(br#"{"id":1,"body":{"PauseContainer":{"id":"c"}}}"#).unwrap();
        assert_eq!(
            r.body,
            RequestBody::PauseContainer(ContainerRef { id: "c".into() })
        );
        let r = decode_request(
            br#"{"id":2,"body":{"UpdateContainer":{"id":"c","resources":{"pids":{"limit":5}}}}}"#,
        )
        .unwrap();
        match r.body {
            RequestBody::UpdateContainer(u) => {
                assert_eq!(u.resources.pids, Some(PidsUpdate { limit: 5 }));
            }
            other => panic!("{other:?}"),
        }
        let s = serde_json::to_string(&ResponseBody::Paused).unwrap();
        assert_eq!(s, r#""Paused""#);
        let stats = serde_json::to_value(Stats::default()).unwrap();
        assert!(stats["cpu"]["throttling"]["throttled_periods"].is_u64());
        assert!(stats["memory"]["usage"]["failcnt"].is_u64());
        assert!(stats["pids"]["limit"].is_u64());
        let s = serde_json::to_string(&crate::container::ContainerStatus::Paused).unwrap();
        assert_eq!(s, r#""paused""#);
    }
}
