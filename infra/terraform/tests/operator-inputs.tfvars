# The inputs without a default that reach a function's environment, each set to a placeholder
# naming its variable ("$${" is a literal "${"): function_environments.py prints them as such,
# and crates/fluxa-lambda/tests/watch.rs puts its own values there, as an operator would with
# TF_VAR_api_tokens.
api_tokens = "$${var.api_tokens}"
