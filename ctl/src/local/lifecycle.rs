//! Changing a running mesh the way a cluster does: endpoints come and go (the registry is
//! rewritten through the same `..data` swap), apps crash and restart under their sidecars.

use super::{io_err, Mesh, MeshError, Planned, PodSpec};

impl Mesh {
    /// Adds a pod: creates it, waits until its sidecar is ready, and only then publishes it in
    /// the registry (a pod becomes an endpoint once ready). Returns the registry's new config
    /// version; wait for it with [`Mesh::wait_for_version`] before counting on the endpoint.
    pub fn add_pod(&mut self, spec: PodSpec) -> Result<String, MeshError> {
        if self.pods.iter().any(|p| p.name == spec.name) {
            return Err(MeshError::Failed(format!("pod {} exists", spec.name)));
        }
        let slot = self.next_slot;
        if slot >= 200 {
            return Err(MeshError::Failed("out of pod addresses".into()));
        }
        let planned = Planned::new(spec, slot);
        let mut pod = self.create_pod(&planned)?;
        self.next_slot += 1;
        if pod.spec.sidecar {
            pod.wait_ready()?;
        }
        self.pods.push(pod);
        self.plan.push(planned);
        self.write_files().map_err(io_err("writing the registry"))
    }

    /// Removes a pod the abrupt way: the registry is rewritten without it, then its processes
    /// are killed and its namespace deleted at once, without waiting for the other sidecars to
    /// see the new registry (as when a node dies). Returns the registry's new config version.
    pub fn remove_pod(&mut self, name: &str) -> Result<String, MeshError> {
        let index = self
            .pods
            .iter()
            .position(|p| p.name == name)
            .ok_or_else(|| MeshError::Failed(format!("no pod {name}")))?;
        self.plan.retain(|p| p.spec.name != name);
        let version = self.write_files().map_err(io_err("writing the registry"))?;
        // Kills its sidecar and app, then deletes the namespace and with it the pod's address.
        drop(self.pods.remove(index));
        Ok(version)
    }

    /// SIGKILLs a pod's app (its sidecar keeps running). False if it was not running.
    pub fn kill_app(&mut self, name: &str) -> bool {
        self.pod_mut(name).kill("app")
    }

    /// Starts a pod's app again after [`Mesh::kill_app`]; returns once it is serving.
    pub fn restart_app(&mut self, name: &str) -> Result<(), MeshError> {
        let bin_dir = self.launch.bin_dir.clone();
        let pod = self.pod_mut(name);
        pod.kill("app");
        pod.start_app(&bin_dir)
    }
}
