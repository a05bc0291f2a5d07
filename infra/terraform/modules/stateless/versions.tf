# The providers this module uses; the root module (../../versions.tf) pins their versions.
terraform {
  required_version = ">= 1.0"

  required_providers {
    aws = {
      source = "hashicorp/aws"
    }
  }
}
