//! The providers this build has, made on first use: local (always), aws and azure
//! (cargo features). Images and clones reach them by name through here only.
use crate::error::Result;
use ferry_common::names::Target;
use ferry_provider::{Provider, ProviderError, Settings};
use std::collections::HashMap;
use std::sync::Arc;

pub struct Providers {
    settings: Settings,
    /// Ready providers: the embedded local one, or stand-ins given by tests.
    ready: HashMap<Target, Arc<dyn Provider>>,
    /// The aws provider, made on first use from the default AWS configuration chain.
    #[cfg(feature = "aws")]
    aws: tokio::sync::OnceCell<Arc<ferry_provider_aws::Aws>>,
    /// The azure provider, made on first use from its settings and the default Azure
    /// credential chain.
    #[cfg(feature = "azure")]
    azure: tokio::sync::OnceCell<Arc<ferry_provider_azure::Azure>>,
}

impl std::fmt::Debug for Providers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Providers")
            .field("ready", &self.ready.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl Providers {
    pub fn new(settings: Settings) -> Self {
        let local: Arc<dyn Provider> =
            Arc::new(ferry_provider::local::Local::new(settings.local.clone()));
        Self::with(settings, [(Target::Local, local)].into())
    }

    /// Providers where `ready` stands in for the named ones (tests give a fake local).
    pub fn with(settings: Settings, ready: HashMap<Target, Arc<dyn Provider>>) -> Self {
        Self {
            settings,
            ready,
            #[cfg(feature = "aws")]
            aws: tokio::sync::OnceCell::new(),
            #[cfg(feature = "azure")]
            azure: tokio::sync::OnceCell::new(),
        }
    }

    /// The provider of apps created without `--provider`.
    pub fn default_target(&self) -> Target {
        self.settings.default
    }

    /// Whether the azure provider is configured.
    pub fn azure_configured(&self) -> bool {
        self.settings.azure.is_some()
    }

    /// The provider of `target` if it is made already (local always is); never makes one.
    pub fn made(&self, target: Target) -> Option<Arc<dyn Provider>> {
        if let Some(p) = self.ready.get(&target) {
            return Some(p.clone());
        }
        match target {
            #[cfg(feature = "aws")]
            Target::Aws => self.aws.get().map(|p| p.clone() as Arc<dyn Provider>),
            #[cfg(feature = "azure")]
            Target::Azure => self.azure.get().map(|p| p.clone() as Arc<dyn Provider>),
            #[allow(unreachable_patterns)] // with both clouds built in
            _ => None,
        }
    }

    /// The provider of `target`, made now if it is the first use.
    pub async fn get(&self, target: Target) -> Result<Arc<dyn Provider>> {
        if let Some(p) = self.ready.get(&target) {
            return Ok(p.clone());
        }
        match target {
            #[cfg(feature = "aws")]
            Target::Aws => Ok(self.aws().await),
            #[cfg(feature = "azure")]
            Target::Azure => Ok(self.azure().await?),
            #[allow(unreachable_patterns)] // with both clouds built in
            other => Err(ProviderError::Unavailable(other.to_string()).into()),
        }
    }

    /// The aws provider, loaded from the default AWS configuration on first use.
    #[cfg(feature = "aws")]
    pub async fn aws(&self) -> Arc<ferry_provider_aws::Aws> {
        self.aws
            .get_or_init(|| async { Arc::new(ferry_provider_aws::Aws::load().await) })
            .await
            .clone()
    }

    /// The azure provider, made on first use; an error when it is not configured.
    #[cfg(feature = "azure")]
    pub async fn azure(
        &self,
    ) -> std::result::Result<Arc<ferry_provider_azure::Azure>, ProviderError> {
        let cfg = self.settings.azure.clone().ok_or_else(|| {
            ProviderError::Invalid(
                "the azure provider is not configured: give ferry-cloud serve an [azure] section or --azure-subscription, --azure-resource-group and --azure-location".into(),
            )
        })?;
        self.azure
            .get_or_try_init(|| async { ferry_provider_azure::Azure::load(cfg).map(Arc::new) })
            .await
            .cloned()
    }
}
