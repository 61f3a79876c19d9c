"""Lightning training: LightningModule, offline DataModules and the LightningCLI."""
