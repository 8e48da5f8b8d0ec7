//! A load over several devices, in one pass over the files (one read per byte, in file order):
//! split ([`DevicesPlacement::split`]), each device's own placement taking the groups of the
//! tensors a [`DeviceMap`] gives it; or replicated ([`DevicesPlacement::replicate`]), every device's
//! placement taking every group, each chunk read once into the first device's memory and copied
//! from there into the others' (host to host, before each device's own copy to it). Replicas on
//! GPUs that reach each other go device to device instead (`StagedPlacement::with_replicas`);
//! this host fan-out is for those that do not.
//!
//! Each device's [`Placement::place`] lends its memory only for the time its `readers` run, so
//! the devices' placements are nested: device 0's readers start device 1's placement, and so on;
//! the innermost runs the real readers over a [`Destination`] that routes each chunk to its
//! device's. Every device's threads (a GPU's allocating and copying threads) run side by side.

use std::{sync::Mutex, time::Duration};

use candle_core::DType;
use resource_manager::DeviceId;
use tokio_util::sync::CancellationToken;

use crate::{
    Error,
    device_map::DeviceMap,
    placement::{Chunk, Chunking, Destination, Group, Placed, PlacedTensor, Placement},
};

/// Several devices' placements as one: each tensor on the device its map says (split), or every
/// tensor on every device (replicas).
pub struct DevicesPlacement {
    devices: Vec<(DeviceId, std::sync::Arc<dyn Placement>)>,
    /// The index in `devices` of each tensor, in plan order; `None`: replicas.
    device_of: Option<Vec<usize>>,
}

impl DevicesPlacement {
    /// Split: `devices`, a placement for each of the map's devices, in the map's order.
    pub fn split(devices: Vec<(DeviceId, std::sync::Arc<dyn Placement>)>, map: &DeviceMap) -> Result<Self, Error> {
        let named: Vec<DeviceId> = devices.iter().map(|(d, _)| *d).collect();
        if named != map.devices() {
            return Err(Error::Internal(format!("placements for {named:?}, a map over {:?}", map.devices())));
        }
        let device_of = (0..map.tensors())
            .map(|i| match map.devices_of(i) {
                [one] => Ok(named.iter().position(|d| d == one).unwrap_or(0)),
                _ => Err(Error::Internal("a split load's map holds a replicated tensor".into())),
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { devices, device_of: Some(device_of) })
    }

    /// Replicas: a placement for each device, the first read into.
    pub fn replicate(devices: Vec<(DeviceId, std::sync::Arc<dyn Placement>)>) -> Result<Self, Error> {
        if devices.is_empty() {
            return Err(Error::Internal("a replicated load onto no device".into()));
        }
        Ok(Self { devices, device_of: None })
    }
}

impl Placement for DevicesPlacement {
    /// The first device's, in chunks every device can take.
    fn chunking(&self, total: u64, threads: usize) -> Chunking {
        let cut = self.devices[0].1.chunking(total, threads);
        let most = self.max_chunk();
        Chunking { chunk: cut.chunk.min(most), edge_chunk: cut.edge_chunk.min(most), ..cut }
    }

    fn max_chunk(&self) -> usize {
        self.devices.iter().map(|(_, p)| p.max_chunk()).min().unwrap_or(usize::MAX)
    }

    fn tensor_align(&self) -> u64 {
        self.devices.iter().map(|(_, p)| p.tensor_align()).max().unwrap_or(1)
    }

    fn device_of(&self, index: usize) -> usize {
        self.device_of.as_ref().and_then(|d| d.get(index)).copied().unwrap_or(0)
    }

    fn place(
        &self,
        groups: &[Group],
        chunks: &[Chunk],
        readers: &(dyn Fn(&dyn Destination) + Sync),
    ) -> Result<Box<dyn Placed>, Error> {
        let n = self.devices.len();
        let (parts, route, order) = match self.device_of {
            None => (vec![(groups.to_vec(), chunks.to_vec()); n], None, None),
            Some(_) => {
                let (parts, route) = split_up(groups, chunks, n)?;
                let order = groups.iter().map(|g| (g.device.min(n - 1), g.members.len())).collect();
                (parts, Some(route), Some(order))
            }
        };
        let placed: Vec<Slot> = (0..n).map(|_| Mutex::new(None)).collect();
        let nest = Nest { devices: &self.devices, parts: &parts, route: route.as_deref(), readers, placed: &placed };
        nest.level(0, &[]);
        let mut done = Vec::with_capacity(n);
        for (d, slot) in placed.into_iter().enumerate() {
            let bytes = parts[d].0.iter().map(|g| g.len).sum();
            match resource_manager::sync::into_inner(slot) {
                Some(Ok(p)) => done.push((self.devices[d].0, bytes, p)),
                Some(Err(e)) => return Err(e),
                // A device's placement failed before it lent its memory: its error is above.
                None => return Err(Error::Internal(format!("{} was never placed", self.devices[d].0))),
            }
        }
        Ok(Box::new(DevicesPlaced { parts: done, order }))
    }

    /// Each device's placement converts its own tensors, as for a load of its own (a VMM
    /// placement into new exportable memory on its GPU, so attach still hands them out); the
    /// tensors keep their order.
    fn convert(
        &self,
        tensors: &mut Vec<PlacedTensor>,
        dtype: DType,
        cancel: &CancellationToken,
        _device: &str,
    ) -> Result<usize, Error> {
        let mut slots: Vec<Option<PlacedTensor>> = std::mem::take(tensors).into_iter().map(Some).collect();
        let mut converted = 0;
        for (index, (device, placement)) in self.devices.iter().enumerate() {
            let at: Vec<usize> =
                (0..slots.len()).filter(|&i| slots[i].as_ref().is_some_and(|t| t.device == index)).collect();
            // Each placement sees its tensors as on its only device.
            let mut mine: Vec<PlacedTensor> =
                at.iter().filter_map(|&i| slots[i].take()).map(|t| PlacedTensor { device: 0, ..t }).collect();
            converted += placement.convert(&mut mine, dtype, cancel, &device.to_string())?;
            for (i, t) in at.into_iter().zip(mine) {
                slots[i] = Some(PlacedTensor { device: index, ..t });
            }
        }
        *tensors = slots
            .into_iter()
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| Error::Internal("a tensor on no device of the load, or lost in a conversion".into()))?;
        Ok(converted)
    }
}

/// A split load's groups and chunks per device, renumbered as each device's own, and each chunk's
/// (device, index on it).
#[allow(clippy::type_complexity)] // two plain lists, named by the comment
fn split_up(
    groups: &[Group],
    chunks: &[Chunk],
    n: usize,
) -> Result<(Vec<(Vec<Group>, Vec<Chunk>)>, Vec<(usize, usize)>), Error> {
    let mut parts: Vec<(Vec<Group>, Vec<Chunk>)> = vec![(Vec::new(), Vec::new()); n];
    let mut local_group = Vec::with_capacity(groups.len());
    for group in groups {
        let d = group.device.min(n - 1);
        local_group.push((d, parts[d].0.len()));
        parts[d].0.push(group.clone());
    }
    let mut route = Vec::with_capacity(chunks.len());
    for chunk in chunks {
        let &(d, group) =
            local_group.get(chunk.group).ok_or_else(|| Error::Internal(format!("chunk {chunk:?} of no group")))?;
        route.push((d, parts[d].1.len()));
        parts[d].1.push(Chunk { group, ..*chunk });
    }
    Ok((parts, route))
}

/// Every device's memory for every chunk: read into the first's, copied from there into the
/// others' (each device's placement then copies it on to its device as for a load of its own).
struct FanOut<'r> {
    devices: &'r [&'r dyn Destination],
}

impl Destination for FanOut<'_> {
    fn fill(
        &self,
        index: usize,
        stop: &dyn Fn() -> bool,
        fill: &mut dyn FnMut(&mut [u8]) -> Result<(), Error>,
    ) -> Result<bool, Error> {
        let Some((first, rest)) = self.devices.split_first() else {
            return Err(Error::Internal("a fan-out to no device".into()));
        };
        first.fill(index, stop, &mut |read| {
            fill(read)?;
            for other in rest {
                // The others wait for a buffer as the first did; a stop while waiting ends the
                // load (the first device holds bytes the others never got).
                let copied = other.fill(index, stop, &mut |copy| {
                    copy.copy_from_slice(read);
                    Ok(())
                })?;
                if !copied {
                    return Err(Error::Cancelled);
                }
            }
            Ok(())
        })
    }
}

/// A device, the bytes of its groups, and what its placement placed.
type DevicePlaced = (DeviceId, u64, Box<dyn Placed>);

/// What one device's placement returned, once it has.
type Slot = Mutex<Option<Result<Box<dyn Placed>, Error>>>;

/// The nesting of the devices' placements (see the module's comment).
struct Nest<'a> {
    devices: &'a [(DeviceId, std::sync::Arc<dyn Placement>)],
    parts: &'a [(Vec<Group>, Vec<Chunk>)],
    /// Each chunk's (device, index on it); `None`: every chunk goes to every device.
    route: Option<&'a [(usize, usize)]>,
    readers: &'a (dyn Fn(&dyn Destination) + Sync),
    placed: &'a [Slot],
}

impl Nest<'_> {
    /// Places device `level` and, while it lends its memory, the devices after it; the last
    /// runs the readers over every device's memory (`lent`, one per device before it).
    fn level(&self, level: usize, lent: &[&dyn Destination]) {
        if level == self.devices.len() {
            match self.route {
                Some(route) => (self.readers)(&Route { devices: lent, route }),
                None => (self.readers)(&FanOut { devices: lent }),
            }
            return;
        }
        let (groups, chunks) = &self.parts[level];
        let placed = self.devices[level].1.place(groups, chunks, &|memory| {
            let mut lent = lent.to_vec();
            lent.push(memory);
            self.level(level + 1, &lent);
        });
        *resource_manager::sync::lock(&self.placed[level]) = Some(placed);
    }
}

/// Every device's memory as one: a chunk goes to its device's, by its number there.
struct Route<'r> {
    devices: &'r [&'r dyn Destination],
    /// Each chunk's (device, index on it).
    route: &'r [(usize, usize)],
}

impl Destination for Route<'_> {
    fn fill(
        &self,
        index: usize,
        stop: &dyn Fn() -> bool,
        fill: &mut dyn FnMut(&mut [u8]) -> Result<(), Error>,
    ) -> Result<bool, Error> {
        let &(device, local) = self.route.get(index).ok_or_else(|| Error::Internal(format!("no chunk {index}")))?;
        let memory = self.devices.get(device).ok_or_else(|| Error::Internal(format!("no device {device}")))?;
        memory.fill(local, stop, fill)
    }
}

/// Every device's placed groups, until step 6.
struct DevicesPlaced {
    /// Each device, the bytes of its groups, and what it placed.
    parts: Vec<DevicePlaced>,
    /// Each group of a split load, in order: its device and its tensors' count; `None` for
    /// replicas: every device's tensors, the first device's then the next's.
    order: Option<Vec<(usize, usize)>>,
}

impl Placed for DevicesPlaced {
    fn read_detail(&self, _total: u64, reading: Duration, threads: usize) -> String {
        let each = self.parts.iter().map(|(d, bytes, p)| format!("{d}: {}", p.read_detail(*bytes, reading, threads)));
        each.collect::<Vec<_>>().join("; ")
    }

    /// Every device's tensors, back in the load's group order.
    fn finish(self: Box<Self>, _total: u64, reading: Duration) -> Result<(Vec<PlacedTensor>, String), Error> {
        let mut details = Vec::with_capacity(self.parts.len());
        let mut each = Vec::with_capacity(self.parts.len());
        for (device, bytes, placed) in self.parts {
            let (tensors, detail) = placed.finish(bytes, reading)?;
            details.push(format!("{device}: {detail}"));
            each.push(tensors.into_iter());
        }
        let Some(order) = self.order else {
            let tensors =
                each.into_iter().enumerate().flat_map(|(device, t)| t.map(move |t| PlacedTensor { device, ..t }));
            return Ok((tensors.collect(), details.join("; ")));
        };
        let mut tensors = Vec::with_capacity(order.iter().map(|(_, n)| n).sum());
        for (device, count) in order {
            let before = tensors.len();
            tensors.extend(each[device].by_ref().take(count).map(|t| PlacedTensor { device, ..t }));
            if tensors.len() != before + count {
                return Err(Error::Internal(format!("device {device} placed fewer tensors than its groups hold")));
            }
        }
        Ok((tensors, details.join("; ")))
    }
}
