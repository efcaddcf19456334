"""Deploy to ARM boards: over TVM RPC (``remote``), as a self-contained bundle (``bundle``), and the emulated
Raspberry Pi that CI uses (``board``). None of these modules imports TVM at import time."""

from tvm_lowbit.deploy.bundle import export_bundle
from tvm_lowbit.deploy.remote import Board, DeployError, DeployReport, deploy, deploy_artifact

__all__ = ["Board", "DeployError", "DeployReport", "deploy", "deploy_artifact", "export_bundle"]
