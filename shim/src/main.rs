//! `vessel`: the runc-compatible command line (skeleton; filled by the containers issue).

fn main() -> anyhow::Result<()> {
    anyhow::bail!("vessel: the runc-compatible CLI is not implemented yet (see README)")
}
