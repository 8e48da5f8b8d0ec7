//! Where one load's tensors go: a set of devices and how the model is laid over them. A load to
//! one device is a set of one; several GPUs either split the model (each tensor on one of them)
//! or hold a replica each.

use std::fmt;

use crate::{DeviceId, DeviceRequest, ResourceError, ResourceManager};

/// The most devices a request may list: more than any machine has, a bound on what a request
/// makes the server parse.
pub const MAX_TARGET_DEVICES: usize = 64;

/// Devices as a request names them: one (`cuda:1`), a list (`cuda:0,cuda:1`), or every GPU of
/// the machine (`cuda:*`); not yet checked against the build and the machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetRequest {
    Devices(Vec<DeviceRequest>),
    AllGpus,
}

impl std::str::FromStr for TargetRequest {
    type Err = ResourceError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "cuda:*" {
            return Ok(Self::AllGpus);
        }
        let parts: Vec<&str> = s.split(',').collect();
        if parts.len() > MAX_TARGET_DEVICES {
            let shown = s.chars().take(40).collect::<String>();
            return Err(ResourceError::InvalidDevice(format!("{shown}…: more than {MAX_TARGET_DEVICES} devices")));
        }
        parts.into_iter().map(str::parse).collect::<Result<_, _>>().map(Self::Devices)
    }
}

impl ResourceManager {
    /// The devices a request names (none: the server's default device), as a [`Target`] laid out
    /// as `layout` asks (a list defaults to [`Layout::Split`]), if this build and machine have
    /// every one of them.
    pub fn resolve_target(
        &self,
        request: Option<&TargetRequest>,
        layout: Option<Layout>,
    ) -> Result<Target, ResourceError> {
        let devices = match request {
            None => match &self.default_target {
                Some(default) => default.devices().to_vec(),
                None => vec![self.resolve(None)?],
            },
            Some(TargetRequest::Devices(devices)) => {
                // The list's shape first (invalid whatever the machine), then each device in it.
                Target::new(devices.iter().map(|d| d.id()).collect(), Layout::default())?;
                devices.iter().map(|d| self.resolve(Some(*d))).collect::<Result<Vec<_>, _>>()?
            }
            Some(TargetRequest::AllGpus) => {
                let gpus: Vec<DeviceId> =
                    self.devices.iter().map(|d| d.id).filter(|d| matches!(d, DeviceId::Cuda(_))).collect();
                if gpus.is_empty() {
                    return Err(ResourceError::DeviceUnavailable {
                        device: "cuda:*".into(),
                        reason: "this server has no CUDA device".into(),
                    });
                }
                gpus
            }
        };
        // A load that names no device takes the default's layout too, unless it asks another.
        let default_layout = self.default_target.as_ref().filter(|_| request.is_none()).map(Target::layout);
        Target::new(devices, layout.or(default_layout).unwrap_or_default())
    }

    /// Where loads that name no device go (`--device`, `--placement`): one device, or several
    /// GPUs; checked against this build and machine now.
    pub fn set_default_target(&mut self, request: &TargetRequest, layout: Option<Layout>) -> Result<(), ResourceError> {
        let target = self.resolve_target(Some(request), layout)?;
        self.default_device = target.first();
        self.default_target = Some(target);
        Ok(())
    }
}

/// How a model is laid over the devices of its [`Target`]. With one device both mean the same.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Layout {
    /// Each tensor on one of the devices: whole layers or components, balanced by bytes unless an
    /// explicit map says where.
    #[default]
    Split,
    /// Every tensor on every device.
    Replicate,
}

impl Layout {
    /// The name a request spells it with.
    pub fn name(self) -> &'static str {
        match self {
            Self::Split => "split",
            Self::Replicate => "replicate",
        }
    }
}

impl std::str::FromStr for Layout {
    type Err = ResourceError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "split" => Ok(Self::Split),
            "replicate" => Ok(Self::Replicate),
            _ => Err(ResourceError::InvalidPlacement(s.chars().take(40).collect())),
        }
    }
}

/// The devices of one load, in the order the request named them (the first holds what is not
/// assigned elsewhere), distinct and never empty, and its [`Layout`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Target {
    devices: Vec<DeviceId>,
    layout: Layout,
}

impl Target {
    /// One device.
    pub fn one(device: DeviceId) -> Self {
        Self { devices: vec![device], layout: Layout::default() }
    }

    /// Several devices: distinct GPUs, or the CPU alone (host memory is one device).
    pub fn new(devices: Vec<DeviceId>, layout: Layout) -> Result<Self, ResourceError> {
        let invalid = |why: &str| {
            let named = devices.iter().map(ToString::to_string).collect::<Vec<_>>().join(",");
            ResourceError::InvalidDevice(format!("{named}: {why}"))
        };
        if devices.is_empty() {
            return Err(invalid("no device"));
        }
        if devices.iter().enumerate().any(|(i, d)| devices[..i].contains(d)) {
            return Err(invalid("a device is named twice"));
        }
        if devices.len() > 1 && devices.contains(&DeviceId::Cpu) {
            return Err(invalid("several devices must all be GPUs"));
        }
        // One device holds everything either way: one spelling, so equal targets compare equal.
        let layout = if devices.len() == 1 { Layout::default() } else { layout };
        Ok(Self { devices, layout })
    }

    pub fn devices(&self) -> &[DeviceId] {
        &self.devices
    }

    /// The first device named: a single-device load's only one.
    pub fn first(&self) -> DeviceId {
        self.devices[0]
    }

    pub fn layout(&self) -> Layout {
        self.layout
    }

    /// Whether it is one device.
    pub fn is_single(&self) -> bool {
        self.devices.len() == 1
    }

    /// Whether `device` is one of its devices.
    pub fn contains(&self, device: DeviceId) -> bool {
        self.devices.contains(&device)
    }
}

impl fmt::Display for Target {
    /// `cuda:0`, or `cuda:0,cuda:1` for several devices: the devices as a request lists them.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.devices.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{d}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_device_and_several_gpus() {
        let one = Target::one(DeviceId::Cpu);
        assert_eq!((one.devices(), one.first(), one.is_single()), (&[DeviceId::Cpu][..], DeviceId::Cpu, true));
        assert_eq!(one.to_string(), "cpu");
        let two = Target::new(vec![DeviceId::Cuda(1), DeviceId::Cuda(0)], Layout::Replicate).expect("two GPUs");
        assert_eq!((two.first(), two.is_single(), two.contains(DeviceId::Cuda(0))), (DeviceId::Cuda(1), false, true));
        assert_eq!((two.to_string(), two.layout()), ("cuda:1,cuda:0".into(), Layout::Replicate));
        let one_replica = Target::new(vec![DeviceId::Cuda(0)], Layout::Replicate).expect("one GPU");
        assert_eq!(one_replica, Target::one(DeviceId::Cuda(0)), "one device is one target whatever its layout");
    }

    #[test]
    fn empty_repeated_and_mixed_sets_are_refused() {
        for (devices, why) in [
            (vec![], "no device"),
            (vec![DeviceId::Cuda(0), DeviceId::Cuda(0)], "named twice"),
            (vec![DeviceId::Cpu, DeviceId::Cuda(0)], "must all be GPUs"),
        ] {
            let e = Target::new(devices, Layout::Split).expect_err(why);
            assert!(e.to_string().contains(why), "{e}");
        }
    }

    #[test]
    fn requests_name_one_device_a_list_or_every_gpu() {
        let parse = |s: &str| s.parse::<TargetRequest>();
        assert_eq!(parse("cpu"), Ok(TargetRequest::Devices(vec![DeviceRequest::Cpu])));
        assert_eq!(
            parse("cuda:0,cuda:1"),
            Ok(TargetRequest::Devices(vec![DeviceRequest::Cuda(Some(0)), DeviceRequest::Cuda(Some(1))]))
        );
        assert_eq!(parse("cuda:*"), Ok(TargetRequest::AllGpus));
        for bad in ["", "cuda:0,", "cuda:0, cuda:1", "cuda:*,cuda:1", "gpu0"] {
            assert!(matches!(parse(bad), Err(ResourceError::InvalidDevice(_))), "{bad:?}");
        }
        let long = vec!["cuda:1"; MAX_TARGET_DEVICES + 1].join(",");
        let e = parse(&long).expect_err("too many");
        assert!(e.to_string().contains("more than 64 devices") && e.to_string().len() < 200, "{e}");
    }

    /// Resolved against this process's devices: the CPU alone here; GPUs only in a CUDA build
    /// on a machine that has them.
    #[test]
    fn requests_resolve_against_the_machine() {
        let resources =
            ResourceManager::with_cpu_capacity(1 << 30, crate::MemoryBudget::Percent(50.0), DeviceRequest::Cpu)
                .expect("resources");
        assert_eq!(resources.resolve_target(None, None), Ok(Target::one(DeviceId::Cpu)));
        let cpu = "cpu".parse().expect("cpu");
        assert_eq!(
            resources.resolve_target(Some(&cpu), Some(Layout::Replicate)).map(|t| t.devices().to_vec()),
            Ok(vec![DeviceId::Cpu])
        );
        let cpu_twice = "cpu,cpu".parse().expect("parses");
        assert!(
            resources.resolve_target(Some(&cpu_twice), None).expect_err("twice").to_string().contains("named twice")
        );
        #[cfg(not(feature = "cuda"))]
        for request in ["cuda:0,cuda:1", "cuda:*"] {
            let e = resources.resolve_target(Some(&request.parse().expect("parses")), None).expect_err(request);
            assert!(matches!(e, ResourceError::DeviceUnavailable { .. }), "{request}: {e}");
        }
    }

    /// A default of several GPUs (on fake GPUs' books): loads that name none go there, with its
    /// layout unless they ask another; a default the machine lacks is refused when set.
    #[test]
    fn a_default_target_applies_to_loads_that_name_none() {
        let mut resources =
            ResourceManager::with_test_devices(1 << 30, &[1 << 30, 1 << 30], crate::MemoryBudget::Percent(50.0));
        let both = "cuda:*".parse().expect("every GPU");
        resources.set_default_target(&both, Some(Layout::Replicate)).expect("two fake GPUs");
        let gpus = [DeviceId::Cuda(0), DeviceId::Cuda(1)];
        let default = resources.resolve_target(None, None).expect("default");
        assert_eq!((default.devices(), default.layout()), (&gpus[..], Layout::Replicate));
        assert_eq!(resources.resolve_target(None, Some(Layout::Split)).map(|t| t.layout()), Ok(Layout::Split));
        let cpu = "cpu".parse().expect("cpu");
        assert_eq!(resources.resolve_target(Some(&cpu), None), Ok(Target::one(DeviceId::Cpu)));
        let missing = "cuda:0,cuda:5".parse().expect("parses");
        assert!(matches!(resources.set_default_target(&missing, None), Err(ResourceError::DeviceUnavailable { .. })));
    }

    #[test]
    fn layouts_parse_by_name() {
        assert_eq!("split".parse::<Layout>(), Ok(Layout::Split));
        assert_eq!("replicate".parse::<Layout>(), Ok(Layout::Replicate));
        assert!("mirror".parse::<Layout>().expect_err("unknown").to_string().contains("mirror"));
    }
}
