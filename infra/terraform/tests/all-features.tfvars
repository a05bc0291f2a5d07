# Every optional part switched on, so that checkov (scripts/terraform-check.sh) and the tfparse
# assertions (test_terraform.py) also see the resources a default deployment leaves out.
enable_admin_function = true
processor_drains_dlq  = true
create_vpc_endpoints  = true
