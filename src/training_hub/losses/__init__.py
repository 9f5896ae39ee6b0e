"""Small, documented loss functions shared by the engines (pure tensor code, no model or data handling)."""
