# Cascade Mask R-CNN Swin-S (reference: ..._swin_small_patch4_window7_mstrain_480-800_giou_4conv1f_adamw_3x_coco)
_base_ = './cascade_mask_rcnn_swin_t.py'
model = dict(backbone=dict(depths=[2, 2, 18, 2], drop_path_rate=0.3))
