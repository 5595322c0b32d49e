//! A container's `resources` as the runtime applies them through cgroups: the memory limit, the
//! CPU limit as a CFS quota, the CPU request as a share, the way the kubelet converts them.

use anyhow::{bail, Context, Result};
use k8s_openapi::api::core::v1::ResourceRequirements;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use oci_spec::runtime::{LinuxCpuBuilder, LinuxMemoryBuilder, LinuxResources, LinuxResourcesBuilder};

/// The CFS period the kubelet uses (100 ms).
const CFS_PERIOD_US: u64 = 100_000;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Resources {
    pub memory_limit_bytes: Option<i64>,
    pub cpu_limit_millis: Option<i64>,
    pub cpu_request_millis: Option<i64>,
}

impl Resources {
    /// Reads `limits.memory`, `limits.cpu` and `requests.cpu`; other resources are ignored.
    pub fn from_kubernetes(r: Option<&ResourceRequirements>) -> Result<Resources> {
        let Some(r) = r else { return Ok(Resources::default()) };
        let get = |map: &Option<std::collections::BTreeMap<String, Quantity>>, key: &str, scale: f64, field: &str| {
            map.as_ref()
                .and_then(|m| m.get(key))
                .map(|q| {
                    quantity(&q.0).map(|v| (v * scale).ceil() as i64).with_context(|| format!("resources.{field}"))
                })
                .transpose()
        };
        Ok(Resources {
            memory_limit_bytes: get(&r.limits, "memory", 1.0, "limits.memory")?,
            cpu_limit_millis: get(&r.limits, "cpu", 1000.0, "limits.cpu")?,
            cpu_request_millis: get(&r.requests, "cpu", 1000.0, "requests.cpu")?,
        })
    }

    /// The cgroup settings; `devices` are the runtime's device rules, kept as they are.
    pub fn to_linux(self, devices: Vec<oci_spec::runtime::LinuxDeviceCgroup>) -> Result<LinuxResources> {
        let mut cpu = LinuxCpuBuilder::default();
        if let Some(m) = self.cpu_limit_millis {
            // At least 1 ms per period, as the kubelet does.
            cpu = cpu.quota((m * CFS_PERIOD_US as i64 / 1000).max(1000)).period(CFS_PERIOD_US);
        }
        if let Some(m) = self.cpu_request_millis {
            cpu = cpu.shares((m as u64 * 1024 / 1000).max(2));
        }
        let mut r = LinuxResourcesBuilder::default().devices(devices).cpu(cpu.build()?);
        if let Some(bytes) = self.memory_limit_bytes {
            r = r.memory(LinuxMemoryBuilder::default().limit(bytes).build()?);
        }
        Ok(r.build()?)
    }
}

/// A Kubernetes quantity (`500m`, `128Mi`, `1.5`, `2G`, `1e3`) as a number.
pub fn quantity(s: &str) -> Result<f64> {
    const SUFFIXES: [(&str, f64); 15] = [
        ("Ki", 1024.0),
        ("Mi", 1048576.0),
        ("Gi", 1073741824.0),
        ("Ti", 1099511627776.0),
        ("Pi", 1125899906842624.0),
        ("Ei", 1152921504606846976.0),
        ("n", 1e-9),
        ("u", 1e-6),
        ("m", 1e-3),
        ("k", 1e3),
        ("M", 1e6),
        ("G", 1e9),
        ("T", 1e12),
        ("P", 1e15),
        ("E", 1e18),
    ];
    let (number, scale) =
        SUFFIXES.iter().find_map(|(suffix, scale)| s.strip_suffix(suffix).map(|n| (n, *scale))).unwrap_or((s, 1.0));
    match number.parse::<f64>() {
        Ok(v) if v.is_finite() && v >= 0.0 => Ok(v * scale),
        _ => bail!("`{s}` is not a quantity (e.g. 500m, 128Mi, 1.5)"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities_as_kubernetes_writes_them() {
        for (s, v) in [("500m", 0.5), ("1", 1.0), ("1.5", 1.5), ("128Mi", 134217728.0), ("2G", 2e9), ("1e3", 1000.0)] {
            assert_eq!(quantity(s).unwrap(), v, "{s}");
        }
        for bad in ["", "abc", "-1", "12Q"] {
            assert!(quantity(bad).unwrap_err().to_string().contains(&format!("`{bad}`")), "{bad}");
        }
    }

    #[test]
    fn the_manifests_limits_become_cgroup_settings() {
        let r: ResourceRequirements =
            serde_yaml::from_str("limits: {cpu: 500m, memory: 128Mi}\nrequests: {cpu: 50m, memory: 32Mi}\n").unwrap();
        let res = Resources::from_kubernetes(Some(&r)).unwrap();
        assert_eq!(
            res,
            Resources {
                memory_limit_bytes: Some(128 << 20),
                cpu_limit_millis: Some(500),
                cpu_request_millis: Some(50)
            }
        );
        let linux = res.to_linux(vec![]).unwrap();
        let cpu = linux.cpu().as_ref().unwrap();
        assert_eq!((cpu.quota(), cpu.period(), cpu.shares()), (Some(50_000), Some(100_000), Some(51)));
        assert_eq!(linux.memory().as_ref().unwrap().limit(), Some(128 << 20));

        let bad: ResourceRequirements = serde_yaml::from_str("limits: {memory: lots}\n").unwrap();
        let e = format!("{:#}", Resources::from_kubernetes(Some(&bad)).unwrap_err());
        assert!(e.contains("resources.limits.memory") && e.contains("`lots`"), "{e}");
    }
}
