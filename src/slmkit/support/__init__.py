"""The customer-service assistant (`slm support`): intent, retrieval from the help center, a grounded reply, and a
hand-off to people (a ticket in the hand-off queue) when the case needs one."""
